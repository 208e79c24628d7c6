// Writes the seed corpus of checkpoint_fuzz: complete checkpoints of small models covering
// every layer kind with state, both optimizers and both modes. Run once; the output is
// committed under tests/fuzz/corpus/checkpoint/.
//   make_checkpoint_seeds <output dir>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "core/model.h"
#include "server/checkpoint.h"

namespace {

using normd::LayerConfig;
using normd::LayerKind;

LayerConfig Layer(LayerKind kind) {
  LayerConfig l;
  l.kind = kind;
  return l;
}

bool Write(const std::string& dir, const std::string& name, const normd::ModelConfig& config,
           bool training, bool frozen) {
  std::unique_ptr<normd::Model> model;
  normd::Status st = normd::Model::Create(config, normd::Sequential::Limits(), &model);
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), st.message().c_str());
    return false;
  }
  model->SetMode(training, frozen);
  normd::v1::ModelSpec spec;  // the loader does not interpret the spec; a small one suffices
  for (int64_t d : config.input_shape) spec.add_input_shape(d);
  spec.set_seed(config.seed);
  normd::server::CheckpointSnapshot snap;
  st = normd::server::SnapshotCheckpoint(name, spec, *model, &snap);
  if (!st.ok()) return false;
  std::ofstream(dir + "/" + name + ".nckpt", std::ios::binary) << snap.bytes;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <output dir>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  bool ok = true;

  normd::ModelConfig mlp;
  mlp.input_shape = {4};
  LayerConfig lin = Layer(LayerKind::kLinear);
  lin.linear = {4, 3, true};
  mlp.layers.push_back(lin);
  LayerConfig bn = Layer(LayerKind::kBatchNorm1d);
  bn.batch_norm.num_features = 3;
  mlp.layers.push_back(bn);
  mlp.layers.push_back(Layer(LayerKind::kReLU));
  lin.linear = {3, 2, false};
  mlp.layers.push_back(lin);
  mlp.optimizer.kind = normd::OptimizerKind::kSgd;
  mlp.optimizer.sgd.momentum = 0.9f;
  ok &= Write(dir, "mlp-sgd-train", mlp, true, false);
  mlp.optimizer.kind = normd::OptimizerKind::kAdam;
  ok &= Write(dir, "mlp-adam-eval", mlp, false, false);

  normd::ModelConfig conv;
  conv.input_shape = {1, 4, 4};
  LayerConfig c = Layer(LayerKind::kConv2d);
  c.conv2d.in_channels = 1;
  c.conv2d.out_channels = 2;
  c.conv2d.kernel_size = 3;
  conv.layers.push_back(c);
  LayerConfig bn2 = Layer(LayerKind::kBatchNorm2d);
  bn2.batch_norm.num_features = 2;
  bn2.batch_norm.affine = false;
  conv.layers.push_back(bn2);
  conv.layers.push_back(Layer(LayerKind::kFlatten));
  LayerConfig ln = Layer(LayerKind::kLayerNorm);
  ln.layer_norm.normalized_shape = {8};
  conv.layers.push_back(ln);
  conv.loss = normd::LossKind::kMse;
  ok &= Write(dir, "conv-frozen", conv, true, true);
  return ok ? 0 : 1;
}
