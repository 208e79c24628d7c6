#include "core/gradient_buckets.h"

#include <cassert>
#include <cstring>

#include "core/sequential.h"

namespace normd {

GradientBuckets::GradientBuckets(Sequential* net, int64_t bucket_bytes,
                                 int64_t in_place_bytes) {
  const int layers = net->num_layers();
  ready_at_.resize(layers);
  // The nodes of top-level layer j are top_node(j) and, for a block, the nodes after it up to
  // the next top-level layer's (module order); the blocks themselves hold no parameters.
  auto node_end = [&](int j) { return j + 1 < layers ? net->top_node(j + 1) : net->num_nodes(); };
  Bucket open;
  int64_t open_bytes = 0;
  for (int j = layers - 1; j >= 0; --j) {
    for (int i = net->top_node(j); i < node_end(j); ++i) {
      Layer* layer = net->node(i).layer;
      if (layer->AsResidualBlock() != nullptr) continue;
      for (Parameter* p : layer->parameters()) {
        const int64_t bytes = p->grad.size() * static_cast<int64_t>(sizeof(float));
        if (bytes >= in_place_bytes) {
          // Its own bucket, summed in place: copying it in and out would cost more than the
          // message it saves.
          Bucket alone;
          alone.params.push_back(p);
          ready_at_[j].push_back(static_cast<int>(buckets_.size()));
          buckets_.push_back(std::move(alone));
          continue;
        }
        open.params.push_back(p);
        open_bytes += bytes;
      }
    }
    // Close the bucket at a layer boundary once it is big enough, and below the first layer.
    if (!open.params.empty() && (open_bytes >= bucket_bytes || j == 0)) {
      if (open.params.size() > 1) open.buffer.resize(open_bytes / sizeof(float));
      ready_at_[j].push_back(static_cast<int>(buckets_.size()));
      buckets_.push_back(std::move(open));
      open = Bucket();
      open_bytes = 0;
    }
  }
}

void GradientBuckets::Begin(Collective* collective) {
  assert(collective_ == nullptr);
  collective_ = collective;
  for (Bucket& b : buckets_) b.started = false;
}

void GradientBuckets::Start(Bucket* b) {
  b->started = true;
  if (b->buffer.empty()) {
    Tensor& g = b->params[0]->grad;
    collective_->StartAllReduceSum(g.data(), g.size());
    return;
  }
  float* out = b->buffer.data();
  for (Parameter* p : b->params) {
    std::memcpy(out, p->grad.data(), sizeof(float) * p->grad.size());
    out += p->grad.size();
  }
  collective_->StartAllReduceSum(b->buffer.data(), static_cast<int64_t>(b->buffer.size()));
}

void GradientBuckets::LayerDone(int j) {
  if (ready_at_[j].empty()) {
    collective_->Progress();
    return;
  }
  for (int b : ready_at_[j]) Start(&buckets_[b]);
}

void GradientBuckets::Finish() {
  for (Bucket& b : buckets_) {
    if (!b.started) Start(&b);
  }
  collective_->WaitAll();
  for (Bucket& b : buckets_) {
    if (b.buffer.empty()) continue;
    const float* in = b.buffer.data();
    for (Parameter* p : b.params) {
      std::memcpy(p->grad.data(), in, sizeof(float) * p->grad.size());
      in += p->grad.size();
    }
  }
  collective_ = nullptr;
}

}  // namespace normd
