// The input format of sequence_fuzz, shared with the seed generator (make_fuzz_seeds.cc).
//
// byte 0: the model. bit 0: Adam (else SGD with momentum 0.9); bit 1: a Dropout(0.25) after the
//         ReLU; bit 2: MSE loss on 3 outputs (else cross-entropy over 3 classes).
// then operations, each an op byte followed by its arguments. The op byte is
//   kind = (byte & 0x7f) % kNumOps, model slot = byte >> 7 (two model ids, "a" and "b").
//
// Arguments (one byte each unless noted; reading past the end gives zeros):
//   kCreate, kDelete, kApplyGradients, kResetRunningStats: none
//   kSetMode          bit 0 train, bit 1 set freeze_running_stats, bit 2 its value
//   kForward          a batch (below), then flags: bit 0 retain_for_backward, bit 1 raw
//                     encoding, bit 2 layer_stats
//   kBackward         forward id: 0 -> id 0, 1 -> the newest issued, 2 -> the oldest still
//                     tracked, 3 -> one never issued, other values -> that number;
//                     then grad_output: bits 0-1 variant (0 right shape, 1 one row too many,
//                     2 a NaN, 3 right shape), bit 2 return_grad_input
//   kTrainStep, kEvaluate  a batch, then targets: bits 0-1 variant (0 and 3 valid, 1 a label
//                     out of range or a target of the wrong shape, 2 one label or target row
//                     too few), bit 2 set both labels and target
//   kGetState         bit 0 include_optimizer (the state is kept for kSetState)
//   kSetState         bits 0-2 change to the kept state (0 none, 1 drop the first entry, 2 a NaN,
//                     3 another shape, 4 a counter of 0.5, 5 an unknown name, 6 an entry twice,
//                     7 values halved), bit 3 strict, bit 4 use the other slot's kept state
//   kUpdateOptimizer  bits 0-1 kind (0 the model's, 1 the other, 2 unset), bits 2-4 learning
//                     rate (kLearningRates), bit 5 momentum 0.9 (SGD)
// A batch is a byte: rows = (byte & 7) % 7 (0 to 6), bits 3-5 values (0-4 finite, from one byte
// each, (int8) / 32; 5 one NaN; 6 one +Inf; 7 one 1e30), bit 6 five features instead of four;
// then one byte per value.
#ifndef NORMD_TESTS_FUZZ_SEQUENCE_FUZZ_H_
#define NORMD_TESTS_FUZZ_SEQUENCE_FUZZ_H_

#include <cstdint>
#include <limits>

namespace normd::fuzz {

enum SequenceOp : uint8_t {
  kCreate,
  kDelete,
  kSetMode,
  kForward,
  kBackward,
  kApplyGradients,
  kTrainStep,
  kEvaluate,
  kGetState,
  kSetState,
  kResetRunningStats,
  kUpdateOptimizer,
  kNumOps,
};

constexpr uint8_t kSequenceAdam = 1;
constexpr uint8_t kSequenceDropout = 2;
constexpr uint8_t kSequenceMse = 4;

constexpr int kSequenceFeatures = 4;
constexpr int kSequenceOutputs = 3;
constexpr int kMaxSequenceOps = 64;

constexpr float kLearningRates[8] = {
    1e-3f, 1e-2f, 0.1f, 0.5f, 0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(), 1e6f};

inline uint8_t OpByte(SequenceOp op, int slot) { return static_cast<uint8_t>(op | (slot << 7)); }
// A batch byte: rows, value mode (0-7), five features.
inline uint8_t BatchByte(int rows, int mode, bool five_features = false) {
  return static_cast<uint8_t>(rows | (mode << 3) | (five_features ? 0x40 : 0));
}

}  // namespace normd::fuzz

#endif  // NORMD_TESTS_FUZZ_SEQUENCE_FUZZ_H_
