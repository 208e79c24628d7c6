#include "client/normctl/commands.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <iostream>
#include <sstream>

#include "client/normctl/csv.h"
#include "client/normctl/table.h"
#include "client/normctl/train.h"

namespace normctl {

using normd::client::Client;
namespace v1 = normd::v1;

namespace {

std::string ReadTextFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError("cannot open '" + path + "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  std::string json;
  (void)google::protobuf::util::MessageToJsonString(message, &json, options);
  return json;
}

std::string ShapeString(const google::protobuf::RepeatedField<int64_t>& shape) {
  std::string s = "[";
  for (int i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// A dataset for `model` from args.data. For train/eval the label column defaults to the last.
Dataset Load(const v1::Model& model, const std::string& path, const std::string& label_column) {
  if (path.empty()) throw InputError("--data is required");
  return LoadDataset(model, path, label_column);
}

}  // namespace

std::string OptimizerString(const v1::OptimizerSpec& o) {
  std::ostringstream s;
  switch (o.kind_case()) {
    case v1::OptimizerSpec::kSgd:
      s << "sgd lr=" << o.sgd().lr() << " momentum=" << o.sgd().momentum();
      if (o.sgd().nesterov()) s << " nesterov";
      if (o.sgd().weight_decay() != 0) s << " weight_decay=" << o.sgd().weight_decay();
      break;
    case v1::OptimizerSpec::kAdam:
      s << (o.adam().decoupled_weight_decay() ? "adamw" : "adam") << " lr=" << o.adam().lr();
      if (o.adam().weight_decay() != 0) s << " weight_decay=" << o.adam().weight_decay();
      break;
    default:
      s << "none";
  }
  if (o.has_lr_schedule()) {
    const v1::LrScheduleSpec& l = o.lr_schedule();
    s << ", ";
    if (l.has_warmup()) {
      s << "warm-up " << l.warmup().steps() << " steps from "
        << (l.warmup().has_start_factor() ? l.warmup().start_factor() : 1.0 / 3.0) << "x";
      if (l.decay_case() != v1::LrScheduleSpec::DECAY_NOT_SET) s << " then ";
    }
    if (l.has_step()) {
      s << "step decay every " << l.step().step_size() << " steps by gamma="
        << (l.step().has_gamma() ? l.step().gamma() : 0.1);
    } else if (l.has_cosine()) {
      s << "cosine t_max=" << l.cosine().t_max() << " eta_min=" << l.cosine().eta_min();
    }
  }
  if (o.has_clip_grad_norm()) s << ", clip grad norm " << o.clip_grad_norm().max_norm();
  if (o.no_weight_decay_on_norm_and_bias()) s << ", no weight decay on norm/bias";
  return s.str();
}

std::string ModeName(v1::Mode mode) {
  switch (mode) {
    case v1::MODE_TRAIN:
      return "train";
    case v1::MODE_EVAL:
      return "eval";
    default:
      return "unspecified";
  }
}

std::string LayerKind(const v1::LayerSpec& layer) {
  if (layer.kind_case() == v1::LayerSpec::KIND_NOT_SET) return "?";
  return layer.GetDescriptor()->FindFieldByNumber(layer.kind_case())->name();
}

namespace {

void AppendSpecLayers(const google::protobuf::RepeatedPtrField<v1::LayerSpec>& layers,
                      const std::string& prefix, std::vector<SpecLayer>* out) {
  for (int i = 0; i < layers.size(); ++i) {
    const v1::LayerSpec& layer = layers.Get(i);
    const std::string path = prefix + std::to_string(i);
    out->push_back({path, layer.name().empty() ? path : layer.name(), &layer});
    if (layer.has_residual()) {
      AppendSpecLayers(layer.residual().body(), path + ".body.", out);
      AppendSpecLayers(layer.residual().shortcut(), path + ".shortcut.", out);
    }
  }
}

}  // namespace

std::vector<SpecLayer> SpecLayers(const v1::ModelSpec& spec) {
  std::vector<SpecLayer> out;
  AppendSpecLayers(spec.layers(), "", &out);
  return out;
}

void PrintBatchNormTable(const v1::Model& model, std::ostream& out) {
  TextTable table({"layer", "batches", "mean shift", "var log ratio", "mean update", "var update"});
  for (const v1::BatchNormStatus& bn : model.batch_norms()) {
    table.AddRow({bn.layer(), std::to_string(bn.num_batches_tracked()),
                  General(bn.last_mean_shift()), General(bn.last_var_log_ratio()),
                  General(bn.running_mean_update_norm()), General(bn.running_var_update_norm())});
  }
  if (table.empty()) {
    out << "  (no BatchNorm layers)\n";
  } else {
    table.Print(out, "  ");
  }
}

int RunCreate(Client& client, const Args& args, std::ostream& out) {
  const std::string json = ReadTextFile(args.spec_path);
  // The file is a ModelSpec; a CreateModelRequest ({"id": ..., "spec": {...}}, as grpcurl -d
  // takes it) is accepted too.
  v1::ModelSpec spec;
  std::string id = args.id;
  auto status = google::protobuf::util::JsonStringToMessage(json, &spec);
  if (!status.ok()) {
    v1::CreateModelRequest request;
    if (!google::protobuf::util::JsonStringToMessage(json, &request).ok()) {
      throw InputError("'" + args.spec_path +
                       "' is not a ModelSpec in protobuf JSON: " + std::string(status.message()));
    }
    spec = request.spec();
    if (id.empty()) id = request.id();
  }
  // "TENANT/": the server picks the id, in that tenant's namespace.
  if (!args.tenant.empty() && id.find('/') == std::string::npos) {
    id = args.tenant + "/" + id;
  }
  const v1::Model model = client.CreateModel(spec, id);
  if (args.json) {
    out << ToJson(model) << '\n';
  } else {
    const size_t all = SpecLayers(model.spec()).size();
    out << "created model " << model.id() << ": " << model.spec().layers_size() << " layers"
        << (all != static_cast<size_t>(model.spec().layers_size())
                ? " (" + std::to_string(all) + " with the residual blocks' layers)"
                : "")
        << ", " << model.parameter_count() << " parameters, input "
        << ShapeString(spec.input_shape()) << " -> output " << ShapeString(model.output_shape())
        << '\n';
  }
  return kExitOk;
}

int RunList(Client& client, const Args& args, std::ostream& out) {
  std::vector<v1::Model> models = client.ListModels();
  if (!args.tenant.empty()) {
    models.erase(std::remove_if(models.begin(), models.end(),
                                [&](const v1::Model& m) { return m.tenant() != args.tenant; }),
                 models.end());
  }
  if (args.json) {
    v1::ListModelsResponse response;
    for (const v1::Model& m : models) *response.add_models() = m;
    out << ToJson(response) << '\n';
    return kExitOk;
  }
  if (models.empty()) {
    out << "no models\n";
    return kExitOk;
  }
  TextTable table({"tenant", "id", "mode", "step", "parameters", "layers", "input", "output"});
  for (const v1::Model& m : models) {
    table.AddRow({m.tenant(), m.id(), ModeName(m.mode()), std::to_string(m.step()),
                  std::to_string(m.parameter_count()), std::to_string(m.spec().layers_size()),
                  ShapeString(m.spec().input_shape()), ShapeString(m.output_shape())});
  }
  table.Print(out);
  return kExitOk;
}

int RunGet(Client& client, const Args& args, std::ostream& out) {
  const v1::Model m = client.GetModel(args.id);
  if (args.json) {
    out << ToJson(m) << '\n';
    return kExitOk;
  }
  out << "model       " << m.id() << '\n'
      << "tenant      " << m.tenant() << '\n'
      << "mode        " << ModeName(m.mode())
      << (m.running_stats_frozen() ? " (running statistics frozen)" : "")
      << (m.inference_only() ? " (inference only: a folded copy)" : "") << '\n'
      << "step        " << m.step() << '\n'
      << "parameters  " << m.parameter_count() << '\n'
      << "input       " << ShapeString(m.spec().input_shape()) << '\n'
      << "output      " << ShapeString(m.output_shape()) << '\n'
      << "loss        " << v1::Loss_Name(m.spec().loss());
  if (m.spec().loss_options().label_smoothing() != 0) {
    out << " (label smoothing " << m.spec().loss_options().label_smoothing() << ")";
  }
  out << '\n'
      << "optimizer   " << OptimizerString(m.spec().optimizer()) << '\n'
      << "next lr     " << m.learning_rate() << "\n\n";
  // Layer options: every layer with parameters or running statistics has an entry (a
  // residual block's are its layers').
  std::map<std::string, const v1::LayerOptions*> options;
  for (const v1::LayerOptions& o : m.layer_options()) options[o.layer()] = &o;
  TextTable layers({"#", "name", "kind", "frozen", "trainable"});
  for (const SpecLayer& l : SpecLayers(m.spec())) {
    auto it = options.find(l.label);
    const bool listed = it != options.end();
    layers.AddRow({l.path, l.label, LayerKind(*l.layer),
                   listed ? (it->second->frozen() ? "yes" : "no") : "-",
                   listed ? (it->second->trainable() ? "yes" : "no") : "-"});
  }
  out << "layers\n";
  layers.Print(out, "  ");
  out << "\nBatchNorm (last batch: drift vs running statistics; last running update norms)\n";
  PrintBatchNormTable(m, out);
  return kExitOk;
}

int RunDelete(Client& client, const Args& args, std::ostream& out) {
  client.DeleteModel(args.id);
  out << "deleted model " << args.id << '\n';
  return kExitOk;
}

int RunMode(Client& client, const Args& args, std::ostream& out) {
  v1::Mode mode;
  if (args.mode == "train") {
    mode = v1::MODE_TRAIN;
  } else if (args.mode == "eval") {
    mode = v1::MODE_EVAL;
  } else {
    throw InputError("mode must be 'train' or 'eval' (got '" + args.mode + "')");
  }
  std::optional<bool> freeze;
  if (args.freeze) freeze = true;
  if (args.unfreeze) freeze = false;
  const v1::Model m = client.SetMode(args.id, mode, freeze);
  out << "model " << m.id() << " is in " << ModeName(m.mode()) << " mode"
      << (m.running_stats_frozen() ? " (running statistics frozen)" : "") << '\n';
  return kExitOk;
}

int RunResetStats(Client& client, const Args& args, std::ostream& out) {
  const v1::Model m = client.ResetRunningStats(args.id);
  out << "reset the running statistics of " << m.batch_norms_size() << " BatchNorm layer(s) of "
      << m.id() << '\n';
  return kExitOk;
}

int RunTrain(Client& client, const Args& args, std::ostream& out) {
  const v1::Model model = client.GetModel(args.id);
  const std::string label = args.label_column.empty() ? "-1" : args.label_column;
  const Dataset train = Load(model, args.data, label);
  Dataset val;
  if (!args.val.empty()) val = LoadDataset(model, args.val, label);
  if (args.epochs <= 0) throw InputError("--epochs must be positive");
  if (model.mode() != v1::MODE_TRAIN) {
    std::cerr << "normctl: note: model " << model.id() << " is in " << ModeName(model.mode())
              << " mode; BatchNorm uses running statistics while training\n";
  }
  TrainOptions options;
  options.epochs = args.epochs;
  options.batch = args.batch;
  options.shuffle = args.shuffle;
  options.seed = args.seed;
  options.progress = ParseProgressStyle(args.progress);
  out << "training " << model.id() << " on " << train.n << " samples from " << args.data << ", "
      << args.epochs << " epoch(s) of batch " << args.batch << (args.shuffle ? ", shuffled" : "")
      << '\n';
  Train(client, args.id, train, args.val.empty() ? nullptr : &val, options, out);
  return kExitOk;
}

int RunEval(Client& client, const Args& args, std::ostream& out) {
  const v1::Model model = client.GetModel(args.id);
  const Dataset data = Load(model, args.data, args.label_column.empty() ? "-1" : args.label_column);
  const EvalSummary r =
      EvaluateDataset(client, args.id, data, std::max<int64_t>(args.infer_batch, 1));
  out << "samples   " << r.samples << '\n' << "loss      " << Fixed(r.loss, 6) << '\n';
  if (data.classification) out << "accuracy  " << Fixed(100 * r.accuracy, 2) << "%\n";
  return kExitOk;
}

int RunPredict(Client& client, const Args& args, std::ostream& out) {
  const v1::Model model = client.GetModel(args.id);
  const Dataset data = Load(model, args.data, args.label_column);
  if (model.mode() == v1::MODE_TRAIN) {
    std::cerr << "normctl: note: model " << model.id()
              << " is in train mode: these forwards use batch statistics and update the "
                 "running statistics (normctl mode "
              << model.id() << " eval)\n";
  }
  const normd::client::Tensor y = PredictDataset(client, args.id, data, args.infer_batch);
  std::ofstream file;
  if (!args.out.empty()) {
    file.open(args.out);
    if (!file) throw InputError("cannot write '" + args.out + "'");
  }
  std::ostream& dest = args.out.empty() ? out : file;
  const int64_t rows = y.rows(), cols = y.cols();
  if (args.argmax) {
    std::vector<float> classes(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = y.values.data() + r * cols;
      classes[r] = static_cast<float>(std::max_element(row, row + cols) - row);
    }
    WriteCsv(dest, {"class"}, classes.data(), rows, 1);
  } else {
    std::vector<std::string> header;
    for (int64_t c = 0; c < cols; ++c) header.push_back("output_" + std::to_string(c));
    WriteCsv(dest, header, y.values.data(), rows, cols);
  }
  if (!args.out.empty()) {
    file.close();
    if (!file) throw InputError("error writing '" + args.out + "'");
    out << "wrote " << rows << " predictions (" << (args.argmax ? 1 : cols) << " columns) to "
        << args.out << '\n';
  }
  return kExitOk;
}

int RunAdapt(Client& client, const Args& args, std::ostream& out) {
  const v1::Model model = client.GetModel(args.id);
  const Dataset data = Load(model, args.data, args.label_column);
  const v1::Model adapted = AdaptDataset(client, args.id, data, args.infer_batch);
  out << "adapted the BatchNorm statistics of " << adapted.id() << " to " << data.n
      << " samples\n";
  PrintBatchNormTable(adapted, out);
  return kExitOk;
}

int RunInspect(Client& client, const Args& args, std::ostream& out) {
  const v1::Model model = client.GetModel(args.id);
  Dataset data = Load(model, args.data, args.label_column);
  const int64_t n = std::min(std::max<int64_t>(args.rows, 1), data.n);
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), data.sample_shape.begin(), data.sample_shape.end());
  const normd::client::ForwardResult r =
      client.Forward(args.id, normd::client::TensorView(data.inputs.data(), shape), false, true);
  out << "model " << model.id() << " (" << ModeName(model.mode()) << " mode), one batch of " << n
      << " samples from " << args.data << '\n';
  if (model.mode() == v1::MODE_TRAIN) {
    out << "note: train mode: BatchNorm normalised with this batch's statistics and updated its "
           "running statistics\n";
  }
  TextTable table({"#", "layer", "kind", "in mean", "in std", "out mean", "out std"});
  for (const v1::LayerStats& s : r.layer_stats) {
    table.AddRow({std::to_string(s.index()), s.name(), s.kind(), Fixed(s.input_mean(), 4),
                  Fixed(s.input_std(), 4), Fixed(s.output_mean(), 4), Fixed(s.output_std(), 4)});
  }
  table.Print(out);
  return kExitOk;
}

int RunLr(Client& client, const Args& args, std::ostream& out) {
  const v1::Model model = client.GetModel(args.id);
  v1::OptimizerSpec optimizer = model.spec().optimizer();
  double old_lr = 0;
  switch (optimizer.kind_case()) {
    case v1::OptimizerSpec::kSgd:
      old_lr = optimizer.sgd().lr();
      optimizer.mutable_sgd()->set_lr(static_cast<float>(args.lr));
      break;
    case v1::OptimizerSpec::kAdam:
      old_lr = optimizer.adam().lr();
      optimizer.mutable_adam()->set_lr(static_cast<float>(args.lr));
      break;
    default:
      throw InputError("model " + model.id() + " has no optimizer whose learning rate to change");
  }
  const v1::Model updated = client.UpdateOptimizer(args.id, optimizer);
  out << "learning rate of " << updated.id() << ": " << old_lr << " -> " << args.lr << " ("
      << OptimizerString(updated.spec().optimizer()) << ")\n";
  return kExitOk;
}

int RunRecipe(Client& client, const Args& args, std::ostream& out) {
  const bool schedule = args.warmup_steps || args.step_lr || args.cosine || args.no_schedule;
  if (!schedule && !args.clip_grad_norm && !args.no_clip && !args.no_decay_norm_bias &&
      !args.decay_all) {
    throw InputError("nothing to change: give a schedule (--warmup, --step-lr, --cosine, "
                     "--no-schedule), --clip-grad-norm/--no-clip or "
                     "--no-decay-norm-bias/--decay-all");
  }
  const v1::Model model = client.GetModel(args.id);
  v1::OptimizerSpec optimizer = model.spec().optimizer();
  if (schedule) {
    // The schedule flags describe the whole new schedule; the server restarts a changed one.
    optimizer.clear_lr_schedule();
    if (args.warmup_steps) {
      v1::LinearWarmupSpec* w = optimizer.mutable_lr_schedule()->mutable_warmup();
      w->set_steps(*args.warmup_steps);
      if (args.warmup_start_factor) w->set_start_factor(*args.warmup_start_factor);
    }
    if (args.step_lr) {
      v1::StepLRSpec* st = optimizer.mutable_lr_schedule()->mutable_step();
      st->set_step_size(*args.step_lr);
      if (args.gamma) st->set_gamma(*args.gamma);
    }
    if (args.cosine) {
      v1::CosineAnnealingLRSpec* c = optimizer.mutable_lr_schedule()->mutable_cosine();
      c->set_t_max(*args.cosine);
      if (args.eta_min) c->set_eta_min(*args.eta_min);
    }
  }
  if (args.clip_grad_norm) optimizer.mutable_clip_grad_norm()->set_max_norm(*args.clip_grad_norm);
  if (args.no_clip) optimizer.clear_clip_grad_norm();
  if (args.no_decay_norm_bias) optimizer.set_no_weight_decay_on_norm_and_bias(true);
  if (args.decay_all) optimizer.set_no_weight_decay_on_norm_and_bias(false);
  // args.id as given (with --tenant, "TENANT/ID"): model.id() is the id within its tenant and
  // would name the caller's own tenant's model.
  const v1::Model updated = client.UpdateOptimizer(args.id, optimizer);
  out << "optimizer of " << updated.id() << ": " << OptimizerString(updated.spec().optimizer())
      << "\nlearning rate of the next step: " << updated.learning_rate() << '\n';
  return kExitOk;
}

int RunHealth(Client& client, const Args& args, std::ostream& out) {
  const auto status = client.Health(args.service);
  const std::string name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(status);
  out << (args.service.empty() ? "server" : args.service) << ": " << name << '\n';
  if (status != grpc::health::v1::HealthCheckResponse::SERVING) {
    std::cerr << "normctl: " << client.options().server << " is not serving (" << name << ")\n";
    return kExitError;
  }
  return kExitOk;
}

int RunReplicas(Client& client, const Args& /*args*/, std::ostream& out) {
  const v1::CheckReplicasResponse r = client.CheckReplicas();
  out << "world size: " << r.world_size() << "\nmodels: " << r.models() << '\n';
  for (int rank = 0; rank < r.digests_size(); ++rank) {
    out << "rank " << rank << ": " << r.digests(rank) << '\n';
  }
  out << (r.consistent() ? "replicas: identical on every rank\n" : "replicas: DIFFER\n");
  if (!r.consistent()) {
    std::cerr << "normctl: the ranks' replicas differ (compare the digests above)\n";
    return kExitError;
  }
  return kExitOk;
}

int RunLayer(Client& client, const Args& args, std::ostream& out) {
  if (!args.layer_freeze && !args.layer_unfreeze && !args.trainable && !args.untrainable) {
    throw InputError("nothing to change: give --freeze/--unfreeze and/or "
                     "--trainable/--no-trainable");
  }
  std::vector<v1::LayerOptions> changes;
  for (const std::string& label : args.layers) {
    v1::LayerOptions o;
    o.set_layer(label);
    if (args.layer_freeze || args.layer_unfreeze) o.set_frozen(args.layer_freeze);
    if (args.trainable || args.untrainable) o.set_trainable(args.trainable);
    changes.push_back(o);
  }
  const v1::Model m = client.SetLayerOptions(args.id, changes);
  out << "layer options of " << m.id() << '\n';
  TextTable table({"name", "frozen", "trainable"});
  for (const v1::LayerOptions& o : m.layer_options()) {
    table.AddRow({o.layer(), o.frozen() ? "yes" : "no", o.trainable() ? "yes" : "no"});
  }
  table.Print(out, "  ");
  return kExitOk;
}

int RunFold(Client& client, const Args& args, std::ostream& out) {
  const v1::Model source = client.GetModel(args.id);
  const v1::FoldBatchNormResponse r = client.FoldBatchNorm(args.id, args.fold_as);
  if (args.json) {
    out << ToJson(r.has_model() ? static_cast<const google::protobuf::Message&>(r.model())
                                : static_cast<const google::protobuf::Message&>(r.spec()))
        << '\n';
    return kExitOk;
  }
  // Counted over the whole tree: BatchNorm layers inside residual blocks fold too.
  const std::vector<SpecLayer> before = SpecLayers(source.spec());
  const std::vector<SpecLayer> after = SpecLayers(r.spec());
  out << "folded " << before.size() - after.size() << " BatchNorm layer(s) of " << args.id
      << ": " << before.size() << " -> " << after.size() << " layers\n";
  TextTable layers({"#", "name", "kind"});
  for (const SpecLayer& l : after) layers.AddRow({l.path, l.label, LayerKind(*l.layer)});
  layers.Print(out, "  ");
  if (r.has_model()) {
    out << "created inference-only model " << r.model().id() << " (eval mode, "
        << r.model().parameter_count() << " parameters)\n";
  }
  return kExitOk;
}

}  // namespace normctl
