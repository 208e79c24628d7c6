// Helpers shared by the checkpoint tests that build models from wire specs and read the
// committed checkpoints in tests/fuzz/corpus/checkpoint (written by older versions of normd).
// Test-only; failures are reported through gtest's EXPECT/ADD_FAILURE, never thrown.
#ifndef NORMD_TESTS_SERVER_CHECKPOINT_CORPUS_H_
#define NORMD_TESTS_SERVER_CHECKPOINT_CORPUS_H_

#include <gtest/gtest.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "server/checkpoint.h"
#include "server/convert.h"

namespace normd::server::testing {

// The committed checkpoints, each written before checkpoint header fields and spec options
// added since (layer options, inference_only, the training recipe) existed.
inline constexpr const char* kCorpusCheckpoints[] = {
    "batchnorm-options.nckpt", "mlp-adam-eval.nckpt", "conv-frozen.nckpt",
    "mlp-sgd-train.nckpt"};

// The model `spec` describes (SpecToConfig, then Model::Create with default limits). A spec
// either refuses is a test failure, and the result is then null.
inline std::unique_ptr<Model> BuildFromSpec(const v1::ModelSpec& spec) {
  ModelConfig config;
  Status s = SpecToConfig(spec, &config);
  EXPECT_TRUE(s.ok()) << s.message();
  std::unique_ptr<Model> m;
  if (!s.ok()) return m;
  s = Model::Create(config, Sequential::Limits(), &m);
  EXPECT_TRUE(s.ok()) << s.message();
  return m;
}

// Reads and decodes corpus checkpoint `name` (NORMD_SOURCE_DIR must be defined by the build).
// False, with a test failure recorded, when the file is missing or does not decode.
inline bool ReadCorpusCheckpoint(const std::string& name, LoadedCheckpoint* out) {
  std::ifstream in(std::string(NORMD_SOURCE_DIR) + "/tests/fuzz/corpus/checkpoint/" + name,
                   std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot open corpus checkpoint " << name;
    return false;
  }
  std::stringstream bytes;
  bytes << in.rdbuf();
  const Status s = DecodeCheckpoint(bytes.str(), out);
  EXPECT_TRUE(s.ok()) << name << ": " << s.message();
  return s.ok();
}

}  // namespace normd::server::testing

#endif  // NORMD_TESTS_SERVER_CHECKPOINT_CORPUS_H_
