// parity_driver: runs one case written by torch_parity.py through normd's core, so the script
// can compare every result with PyTorch's.
//
// Usage: parity_driver CASE_FILE OUT_FILE
//
// Both files are sequences of text lines. A tensor line
//   T <name> <rank> <d0> ... <d(rank-1)>
// is followed directly by the tensor's values as raw little-endian float32 (C order).
//
// Case file, one command per line:
//   input_shape <d...>                 per-sample input shape
//   seed <n>
//   layer <kind> [key=value ...]       see ParseLayer for kinds and keys
//   layer residual                     opens a residual block: the layer lines that follow go
//                                        into its body, until
//   layer shortcut                       (then into its shortcut) and
//   layer end                            (closes the block); blocks nest
//   loss ce|mse|bce [label_smoothing=x]
//   optimizer sgd|adam [key=value ...]  hyperparameters, and the recipe: warmup_steps,
//                                      warmup_start_factor, decay=step|cosine, step_size, gamma,
//                                      t_max, eta_min, max_grad_norm, no_decay=0|1
//   build                              Model::Create from the lines above
//   set_state <count>                  + <count> tensors: Model::SetState(strict)
//   mode train|eval [freeze]           Model::SetMode
//   forward <tag>                      + x: Model::Forward        -> T <tag>.out
//   backward <tag>                     + dy: zero grads, Model::Backward on the last forward
//                                        -> T <tag>.gx, T <tag>.grad.<param name> ...
//   train_step <tag>                   + x + target (class labels as floats for ce)
//                                        -> S <tag>.loss, S <tag>.grad_norm (before clipping),
//                                           S <tag>.lr (the rate the step used)
//   predict <tag>                      + x: Model::Predict         -> T <tag>.out
//   evaluate <tag>                     + x + target -> S <tag>.loss, S <tag>.accuracy
//   get_state <tag> [optimizer]        -> T <tag>.<state name> for every entry, in order
//   status <tag>                       Model::batch_norm_status, per BatchNorm layer labelled i
//                                        (its path: "1", "4.body.1"):
//                                        S <tag>.<i>.mean_shift, .var_log_ratio,
//                                        .running_mean_update_norm, .running_var_update_norm,
//                                        .num_batches_tracked
//   reset_stats                        Model::ResetRunningStats
//   layer_options <label> [frozen=0|1] [trainable=0|1]
//                                      Model::SetLayerOptions (an unset key keeps its value)
//   fold <tag>                         + x: FoldBatchNorm, a model built from the folded config
//                                        and state -> T <tag>.<state name> for every entry,
//                                        T <tag>.out (its eval output on x)
//
// Output: the T and S lines above, and "E <tag> <message>" when the core refuses an operation
// (the case then continues). A malformed case file is a driver error: message on stderr, exit 2.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/fold.h"
#include "core/model.h"
#include "core/sequential.h"
#include "core/tensor.h"

namespace normd {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::cerr << "parity_driver: " << message << "\n";
  std::exit(2);
}

std::vector<std::string> Split(const std::string& line) {
  std::istringstream is(line);
  std::vector<std::string> words;
  std::string w;
  while (is >> w) words.push_back(w);
  return words;
}

// key=value options of a command line, starting at word `first`.
class Options {
 public:
  Options(const std::vector<std::string>& words, size_t first) {
    for (size_t i = first; i < words.size(); ++i) {
      size_t eq = words[i].find('=');
      if (eq == std::string::npos) Die("expected key=value, got '" + words[i] + "'");
      values_[words[i].substr(0, eq)] = words[i].substr(eq + 1);
    }
  }
  double Num(const std::string& key, double fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : std::strtod(it->second.c_str(), nullptr);
  }
  int64_t Int(const std::string& key, int64_t fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : std::strtoll(it->second.c_str(), nullptr, 10);
  }
  bool Bool(const std::string& key, bool fallback) const { return Int(key, fallback) != 0; }
  std::string Str(const std::string& key, const std::string& fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : it->second;
  }
  // Comma-separated integers ("3,4").
  std::vector<int64_t> Ints(const std::string& key) const {
    std::vector<int64_t> out;
    auto it = values_.find(key);
    if (it == values_.end()) return out;
    std::string s = it->second;
    for (char& c : s) {
      if (c == ',') c = ' ';
    }
    std::istringstream is(s);
    int64_t v;
    while (is >> v) out.push_back(v);
    return out;
  }

 private:
  std::map<std::string, std::string> values_;
};

LayerConfig ParseLayer(const std::vector<std::string>& words) {
  if (words.size() < 2) Die("layer needs a kind");
  const std::string& kind = words[1];
  Options o(words, 2);
  LayerConfig c;
  if (kind == "linear") {
    c.kind = LayerKind::kLinear;
    c.linear.in_features = o.Int("in", 0);
    c.linear.out_features = o.Int("out", 0);
    c.linear.bias = o.Bool("bias", true);
  } else if (kind == "batchnorm1d" || kind == "batchnorm2d") {
    c.kind = kind == "batchnorm1d" ? LayerKind::kBatchNorm1d : LayerKind::kBatchNorm2d;
    c.batch_norm.num_features = o.Int("num_features", 0);
    c.batch_norm.eps = static_cast<float>(o.Num("eps", 1e-5));
    c.batch_norm.momentum = static_cast<float>(o.Num("momentum", 0.1));
    c.batch_norm.cumulative_average = o.Bool("cumulative", false);
    c.batch_norm.affine = o.Bool("affine", true);
    c.batch_norm.track_running_stats = o.Bool("track", true);
  } else if (kind == "layernorm") {
    c.kind = LayerKind::kLayerNorm;
    c.layer_norm.normalized_shape = o.Ints("shape");
    c.layer_norm.eps = static_cast<float>(o.Num("eps", 1e-5));
    c.layer_norm.elementwise_affine = o.Bool("affine", true);
  } else if (kind == "groupnorm") {
    c.kind = LayerKind::kGroupNorm;
    c.group_norm.num_groups = o.Int("groups", 0);
    c.group_norm.num_channels = o.Int("channels", 0);
    c.group_norm.eps = static_cast<float>(o.Num("eps", 1e-5));
    c.group_norm.affine = o.Bool("affine", true);
  } else if (kind == "instancenorm1d" || kind == "instancenorm2d") {
    c.kind = kind == "instancenorm1d" ? LayerKind::kInstanceNorm1d : LayerKind::kInstanceNorm2d;
    c.instance_norm.num_features = o.Int("num_features", 0);
    c.instance_norm.eps = static_cast<float>(o.Num("eps", 1e-5));
    c.instance_norm.momentum = static_cast<float>(o.Num("momentum", 0.1));
    c.instance_norm.affine = o.Bool("affine", false);
    c.instance_norm.track_running_stats = o.Bool("track", false);
  } else if (kind == "conv2d") {
    c.kind = LayerKind::kConv2d;
    c.conv2d.in_channels = o.Int("in", 0);
    c.conv2d.out_channels = o.Int("out", 0);
    c.conv2d.kernel_size = o.Int("k", 0);
    c.conv2d.stride = o.Int("stride", 1);
    c.conv2d.padding = o.Int("pad", 0);
    c.conv2d.bias = o.Bool("bias", true);
    c.conv2d.groups = o.Int("groups", 1);
  } else if (kind == "adaptiveavgpool2d") {
    c.kind = LayerKind::kAdaptiveAvgPool2d;
  } else if (kind == "maxpool2d" || kind == "avgpool2d") {
    c.kind = kind == "maxpool2d" ? LayerKind::kMaxPool2d : LayerKind::kAvgPool2d;
    c.pool.kernel_size = o.Int("k", 0);
    c.pool.stride = o.Int("stride", 0);
    c.pool.padding = o.Int("pad", 0);
  } else if (kind == "flatten") {
    c.kind = LayerKind::kFlatten;
  } else if (kind == "relu") {
    c.kind = LayerKind::kReLU;
  } else if (kind == "leakyrelu") {
    c.kind = LayerKind::kLeakyReLU;
    c.negative_slope = static_cast<float>(o.Num("slope", 0.01));
  } else if (kind == "tanh") {
    c.kind = LayerKind::kTanh;
  } else if (kind == "sigmoid") {
    c.kind = LayerKind::kSigmoid;
  } else if (kind == "gelu") {
    c.kind = LayerKind::kGELU;
  } else if (kind == "dropout") {
    c.kind = LayerKind::kDropout;
    c.dropout_p = static_cast<float>(o.Num("p", 0.5));
  } else {
    Die("unknown layer kind '" + kind + "'");
  }
  return c;
}

OptimizerConfig ParseOptimizer(const std::vector<std::string>& words) {
  if (words.size() < 2) Die("optimizer needs a kind");
  Options o(words, 2);
  OptimizerConfig c;
  if (words[1] == "sgd") {
    c.kind = OptimizerKind::kSgd;
    c.sgd.lr = static_cast<float>(o.Num("lr", 0.01));
    c.sgd.momentum = static_cast<float>(o.Num("momentum", 0));
    c.sgd.dampening = static_cast<float>(o.Num("dampening", 0));
    c.sgd.nesterov = o.Bool("nesterov", false);
    c.sgd.weight_decay = static_cast<float>(o.Num("weight_decay", 0));
  } else if (words[1] == "adam") {
    c.kind = OptimizerKind::kAdam;
    c.adam.lr = static_cast<float>(o.Num("lr", 1e-3));
    c.adam.beta1 = static_cast<float>(o.Num("beta1", 0.9));
    c.adam.beta2 = static_cast<float>(o.Num("beta2", 0.999));
    c.adam.eps = static_cast<float>(o.Num("eps", 1e-8));
    c.adam.weight_decay = static_cast<float>(o.Num("weight_decay", 0));
    c.adam.decoupled_weight_decay = o.Bool("decoupled", false);
  } else {
    Die("unknown optimizer '" + words[1] + "'");
  }
  c.schedule.warmup_steps = o.Int("warmup_steps", 0);
  c.schedule.warmup_start_factor = o.Num("warmup_start_factor", 1.0 / 3.0);
  const std::string decay = o.Str("decay", "none");
  if (decay == "step") {
    c.schedule.decay = LrScheduleConfig::Decay::kStep;
  } else if (decay == "cosine") {
    c.schedule.decay = LrScheduleConfig::Decay::kCosine;
  } else if (decay != "none") {
    Die("unknown decay '" + decay + "'");
  }
  c.schedule.step_size = o.Int("step_size", 1);
  c.schedule.gamma = o.Num("gamma", 0.1);
  c.schedule.t_max = o.Int("t_max", 1);
  c.schedule.eta_min = o.Num("eta_min", 0.0);
  c.max_grad_norm = o.Num("max_grad_norm", 0.0);
  c.no_weight_decay_on_norm_and_bias = o.Bool("no_decay", false);
  return c;
}

LossKind ParseLoss(const std::string& name) {
  if (name == "ce") return LossKind::kCrossEntropy;
  if (name == "mse") return LossKind::kMse;
  if (name == "bce") return LossKind::kBceWithLogits;
  Die("unknown loss '" + name + "'");
}

struct NamedData {
  std::string name;
  Shape shape;
  std::vector<float> values;
};

class Reader {
 public:
  explicit Reader(const char* path) : in_(path, std::ios::binary) {
    if (!in_) Die(std::string("cannot open ") + path);
  }
  bool NextLine(std::string* line) { return static_cast<bool>(std::getline(in_, *line)); }

  NamedData ReadTensor() {
    std::string line;
    if (!NextLine(&line)) Die("expected a tensor record, got end of file");
    std::vector<std::string> w = Split(line);
    if (w.size() < 3 || w[0] != "T") Die("expected a tensor record, got '" + line + "'");
    NamedData t;
    t.name = w[1];
    int rank = std::atoi(w[2].c_str());
    if (rank < 0 || rank > kMaxRank || w.size() != static_cast<size_t>(3 + rank)) {
      Die("bad tensor record '" + line + "'");
    }
    for (int i = 0; i < rank; ++i) t.shape.push_back(std::strtoll(w[3 + i].c_str(), nullptr, 10));
    t.values.resize(static_cast<size_t>(t.shape.NumElements()));
    in_.read(reinterpret_cast<char*>(t.values.data()),
             static_cast<std::streamsize>(t.values.size() * sizeof(float)));
    if (!in_) Die("truncated tensor '" + t.name + "'");
    return t;
  }

 private:
  std::ifstream in_;
};

class Writer {
 public:
  explicit Writer(const char* path) : out_(path, std::ios::binary) {
    if (!out_) Die(std::string("cannot create ") + path);
  }
  void WriteTensor(const std::string& name, const Shape& shape, const float* data) {
    out_ << "T " << name << " " << shape.rank();
    for (int64_t d : shape) out_ << " " << d;
    out_ << "\n";
    out_.write(reinterpret_cast<const char*>(data),
               static_cast<std::streamsize>(shape.NumElements() * sizeof(float)));
  }
  void Scalar(const std::string& name, double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    out_ << "S " << name << " " << buf << "\n";
  }
  void Error(const std::string& tag, const Status& s) {
    std::string msg = s.message();
    for (char& c : msg) {
      if (c == '\n') c = ' ';
    }
    out_ << "E " << tag << " " << msg << "\n";
  }
  bool ok() const { return static_cast<bool>(out_); }

 private:
  std::ofstream out_;
};

ConstTensorView View(const NamedData& t) { return ConstTensorView{t.values.data(), t.shape}; }

// Holds a target tensor and, for cross-entropy, its labels converted to integers.
struct TargetData {
  NamedData tensor;
  std::vector<int64_t> labels;
  Targets targets;
};

void ReadTargets(Reader& r, LossKind loss, TargetData* t) {
  t->tensor = r.ReadTensor();
  t->targets = Targets();
  if (loss == LossKind::kCrossEntropy) {
    t->labels.assign(t->tensor.values.begin(), t->tensor.values.end());
    t->targets.labels = t->labels.data();
    t->targets.num_labels = static_cast<int64_t>(t->labels.size());
  } else {
    t->targets.target = View(t->tensor);
  }
}

int Run(const char* case_path, const char* out_path) {
  Reader in(case_path);
  Writer out(out_path);
  ModelConfig config;
  // Where `layer` lines go: the model's list, or the branch of the innermost open residual
  // block (the open blocks, outermost first, and which branch of each is being filled).
  struct OpenBlock {
    LayerConfig* block;
    bool shortcut;
  };
  std::vector<OpenBlock> open_blocks;
  auto current_layers = [&]() -> std::vector<LayerConfig>* {
    if (open_blocks.empty()) return &config.layers;
    const OpenBlock& b = open_blocks.back();
    return b.shortcut ? &b.block->residual.shortcut : &b.block->residual.body;
  };
  std::unique_ptr<Model> model;
  // The last forward, kept for backward together with the input it refers to.
  NamedData last_x;
  ForwardRecord rec;
  bool have_forward = false;
  ForwardRecord scratch;

  auto need_model = [&](const std::string& cmd) {
    if (!model) Die(cmd + " before a successful build");
  };

  std::string line;
  while (in.NextLine(&line)) {
    std::vector<std::string> w = Split(line);
    if (w.empty()) continue;
    const std::string& cmd = w[0];
    const std::string tag = w.size() > 1 ? w[1] : "";
    if (cmd == "input_shape") {
      config.input_shape.clear();
      for (size_t i = 1; i < w.size(); ++i) {
        config.input_shape.push_back(std::strtoll(w[i].c_str(), nullptr, 10));
      }
    } else if (cmd == "seed") {
      config.seed = std::strtoull(tag.c_str(), nullptr, 10);
    } else if (cmd == "layer" && tag == "residual") {
      LayerConfig block;
      block.kind = LayerKind::kResidual;
      current_layers()->push_back(block);
      open_blocks.push_back({&current_layers()->back(), false});
    } else if (cmd == "layer" && tag == "shortcut") {
      if (open_blocks.empty()) Die("'layer shortcut' outside a residual block");
      open_blocks.back().shortcut = true;
    } else if (cmd == "layer" && tag == "end") {
      if (open_blocks.empty()) Die("'layer end' outside a residual block");
      open_blocks.pop_back();
    } else if (cmd == "layer") {
      current_layers()->push_back(ParseLayer(w));
    } else if (cmd == "loss") {
      config.loss = ParseLoss(tag);
      config.label_smoothing = Options(w, 2).Num("label_smoothing", 0.0);
    } else if (cmd == "optimizer") {
      config.optimizer = ParseOptimizer(w);
    } else if (cmd == "build") {
      if (!open_blocks.empty()) Die("build inside an open residual block");
      Status s = Model::Create(config, Sequential::Limits(), &model);
      if (!s.ok()) {
        out.Error("build", s);
        return 0;  // nothing else can run
      }
    } else if (cmd == "set_state") {
      int count = std::atoi(tag.c_str());
      std::vector<NamedTensor> entries;
      for (int i = 0; i < count; ++i) {
        NamedData t = in.ReadTensor();
        entries.push_back(NamedTensor{t.name, t.shape, t.values});
      }
      need_model(cmd);
      Status s = model->SetState(entries, /*strict=*/true);
      if (!s.ok()) {
        out.Error("set_state", s);
        return 0;  // the case cannot start from the intended state
      }
    } else if (cmd == "mode") {
      need_model(cmd);
      bool freeze = w.size() > 2 && w[2] == "freeze";
      model->SetMode(tag == "train", freeze);
      have_forward = false;
    } else if (cmd == "forward" || cmd == "predict") {
      last_x = in.ReadTensor();
      need_model(cmd);
      Status s = cmd == "forward" ? model->Forward(View(last_x), &rec)
                                  : model->Predict(View(last_x), &rec);
      have_forward = s.ok() && cmd == "forward";
      if (!s.ok()) {
        out.Error(tag, s);
        continue;
      }
      out.WriteTensor(tag + ".out", rec.output().shape(), rec.output().data());
    } else if (cmd == "backward") {
      NamedData dy = in.ReadTensor();
      need_model(cmd);
      if (!have_forward) {  // e.g. normd refused the forward that PyTorch accepted
        out.Error(tag, FailedPrecondition("no successful forward to back-propagate"));
        continue;
      }
      model->mutable_net().ZeroGrad();
      Tensor dx;
      Status s = model->Backward(&rec, View(dy), &dx);
      if (!s.ok()) {
        out.Error(tag, s);
        continue;
      }
      out.WriteTensor(tag + ".gx", dx.shape(), dx.data());
      std::vector<Parameter*> params = model->mutable_net().parameters();
      std::vector<std::string> names = model->mutable_net().parameter_names();
      for (size_t i = 0; i < params.size(); ++i) {
        out.WriteTensor(tag + ".grad." + names[i], params[i]->grad.shape(), params[i]->grad.data());
      }
    } else if (cmd == "train_step" || cmd == "evaluate") {
      NamedData x = in.ReadTensor();
      TargetData t;
      ReadTargets(in, config.loss, &t);
      need_model(cmd);
      have_forward = false;
      if (cmd == "train_step") {
        TrainResult r;
        Status s = model->TrainStep(View(x), t.targets, &scratch, &r);
        if (!s.ok()) {
          out.Error(tag, s);
          continue;
        }
        out.Scalar(tag + ".loss", r.loss);
        out.Scalar(tag + ".grad_norm", r.grad_norm);
        out.Scalar(tag + ".lr", r.learning_rate);
      } else {
        EvalResult r;
        Status s = model->Evaluate(View(x), t.targets, &scratch, &r);
        if (!s.ok()) {
          out.Error(tag, s);
          continue;
        }
        out.Scalar(tag + ".loss", r.loss);
        out.Scalar(tag + ".accuracy", r.accuracy);
      }
    } else if (cmd == "get_state") {
      need_model(cmd);
      bool with_optimizer = w.size() > 2 && w[2] == "optimizer";
      for (const NamedTensor& t : model->GetState(with_optimizer)) {
        if (static_cast<int64_t>(t.values.size()) != t.shape.NumElements()) {
          Die("state entry " + t.name + " has " + std::to_string(t.values.size()) +
              " values for shape " + t.shape.ToString());
        }
        out.WriteTensor(tag + "." + t.name, t.shape, t.values.data());
      }
    } else if (cmd == "status") {
      need_model(cmd);
      for (const BatchNormStatus& st : model->batch_norm_status()) {
        const std::string prefix = tag + "." + st.name + ".";
        out.Scalar(prefix + "mean_shift", st.last_mean_shift);
        out.Scalar(prefix + "var_log_ratio", st.last_var_log_ratio);
        out.Scalar(prefix + "running_mean_update_norm", st.running_mean_update_norm);
        out.Scalar(prefix + "running_var_update_norm", st.running_var_update_norm);
        out.Scalar(prefix + "num_batches_tracked", static_cast<double>(st.num_batches_tracked));
      }
    } else if (cmd == "reset_stats") {
      need_model(cmd);
      model->ResetRunningStats();
    } else if (cmd == "layer_options") {
      need_model(cmd);
      Options o(w, 2);
      LayerOptionsChange change;
      change.layer = tag;
      if (o.Int("frozen", -1) >= 0) change.frozen = o.Bool("frozen", false);
      if (o.Int("trainable", -1) >= 0) change.trainable = o.Bool("trainable", true);
      bool frozen_changed = false;
      Status s = model->SetLayerOptions({change}, &frozen_changed);
      if (!s.ok()) out.Error("layer_options", s);
      if (frozen_changed) have_forward = false;
    } else if (cmd == "fold") {
      NamedData x = in.ReadTensor();
      need_model(cmd);
      FoldedModel folded;
      FoldBatchNorm(*model, &folded);
      std::unique_ptr<Model> copy;
      Status s = Model::Create(folded.config, Sequential::Limits(), &copy);
      if (s.ok()) s = copy->SetState(folded.state, /*strict=*/true);
      if (s.ok()) s = copy->Predict(View(x), &scratch);
      if (!s.ok()) {
        out.Error(tag, s);
        continue;
      }
      for (const NamedTensor& t : folded.state) {
        out.WriteTensor(tag + "." + t.name, t.shape, t.values.data());
      }
      out.WriteTensor(tag + ".out", scratch.output().shape(), scratch.output().data());
    } else {
      Die("unknown command '" + cmd + "'");
    }
  }
  if (!out.ok()) Die(std::string("writing ") + out_path + " failed");
  return 0;
}

}  // namespace
}  // namespace normd

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: parity_driver CASE_FILE OUT_FILE\n";
    return 2;
  }
  const uint32_t one = 1;
  unsigned char first_byte;
  std::memcpy(&first_byte, &one, 1);
  if (first_byte != 1) normd::Die("the exchange format is little-endian; this host is not");
  return normd::Run(argv[1], argv[2]);
}
