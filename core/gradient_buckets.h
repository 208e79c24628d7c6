// GradientBuckets: a data-parallel step's gradient all-reduce, overlapped with its backward
// pass (the buckets of PyTorch's DistributedDataParallel).
//
// The model's parameter gradients are grouped, in the order the backward pass finishes them
// (the last top-level layer first), into buckets of at least `bucket_bytes` (a bucket closes at
// a top-level layer's boundary, so a residual block's parameters share one). The backward pass
// reports each finished top-level layer (BackwardListener); once every layer of a bucket is
// done, the bucket's gradients are copied into its buffer and its sum over the ranks starts
// (Collective::StartAllReduceSum): with a collective that completes it in the background it
// travels while the pass goes on below; the MPI one completes it at once (mpi_collective.h
// says why), between the layers. A gradient of at least `in_place_bytes` is a bucket of its
// own; a bucket holding a single parameter is summed in place. Finish starts what the pass
// never reached (layers below the point where a backward without an input gradient stops:
// their gradients are zero), waits for every sum and writes the results back into the
// gradients.
//
// Every rank builds the same buckets from the same model and starts them at the same points of
// the same pass, which is what the Collective contract asks of non-blocking calls. The result
// is the sum over ranks of every gradient, as one AllReduceSum per parameter would give (the
// element-wise sums are the same; only how elements are grouped into messages differs).
//
// Memory: the buffers are allocated once, at construction (about the gradients' size); a step
// allocates nothing. Thread safety: one step at a time (the model is exclusively held).
#ifndef NORMD_CORE_GRADIENT_BUCKETS_H_
#define NORMD_CORE_GRADIENT_BUCKETS_H_

#include <cstdint>
#include <vector>

#include "core/collective.h"
#include "core/layer.h"

namespace normd {

class Sequential;

class GradientBuckets : public BackwardListener {
 public:
  // PyTorch DDP's default is 25 MiB; the models a normd job trains are smaller, and a smaller
  // first bucket starts the communication earlier.
  static constexpr int64_t kDefaultBucketBytes = int64_t{1} << 20;

  // A gradient of at least this size is a bucket of its own, summed in place: the copies in
  // and out of a shared buffer are two passes over it, which cost more than the message saved.
  // The reference MLP's two large weights (1.6 and 1 MB) take ~0.35 ms less per step and rank
  // at batch 256 (perf on a 2-rank job: the copies were 7.9 % of rank 1's time).
  static constexpr int64_t kDefaultInPlaceBytes = int64_t{256} << 10;

  // REQUIRES: `net` outlives this object and keeps its parameters (their addresses and sizes).
  GradientBuckets(Sequential* net, int64_t bucket_bytes = kDefaultBucketBytes,
                  int64_t in_place_bytes = kDefaultInPlaceBytes);

  // Starts a step's all-reduce on `collective`. REQUIRES: no step in flight (Finish was called).
  void Begin(Collective* collective);
  // Top-level layer j's gradients are final: starts every bucket this completes.
  void LayerDone(int j) override;
  // Starts the buckets not started yet, waits for every sum, writes the sums into the gradients.
  void Finish();

  int num_buckets() const { return static_cast<int>(buckets_.size()); }
  // The parameters of bucket b, in the order they were packed.
  const std::vector<Parameter*>& bucket(int b) const { return buckets_[b].params; }

 private:
  struct Bucket {
    std::vector<Parameter*> params;
    std::vector<float> buffer;  // empty for a single-parameter bucket (summed in place)
    bool started = false;
  };
  void Start(Bucket* b);

  std::vector<Bucket> buckets_;
  // ready_at_[j]: the buckets whose last unfinished layer is top-level layer j.
  std::vector<std::vector<int>> ready_at_;
  Collective* collective_ = nullptr;  // set between Begin and Finish
};

}  // namespace normd

#endif  // NORMD_CORE_GRADIENT_BUCKETS_H_
