// normctl: the command-line client of normd. See `normctl --help` and client/README.md.
#include <CLI/CLI.hpp>
#include <cmath>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>

#include "client/normctl/commands.h"
#include "client/normctl/csv.h"

namespace {

using normctl::Args;

// The first non-blank line, trimmed: the same file the server reads with --auth-token-file
// (one token per line, the first being the current one) works here.
std::string ReadToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw normctl::InputError("cannot read token file '" + path + "'");
  std::string line;
  while (std::getline(in, line)) {
    const size_t begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos) continue;
    const size_t end = line.find_last_not_of(" \t\r");
    std::string token = line.substr(begin, end - begin + 1);
    for (const char c : token) {
      if (c < 0x21 || c > 0x7e) {
        throw normctl::InputError("token file '" + path +
                                  "': the token must be printable ASCII without spaces");
      }
    }
    return token;
  }
  throw normctl::InputError("token file '" + path + "' holds no token");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"normctl: train, inspect and serve BatchNorm networks on a normd server"};
  app.require_subcommand(1);

  normd::client::ClientOptions client_options;
  double timeout_seconds = 30;
  std::string token_file;
  app.add_option("--server", client_options.server, "normd address host:port")
      ->envname("NORMCTL_SERVER")
      ->capture_default_str();
  app.add_option("--timeout", timeout_seconds, "Deadline of each call, in seconds")
      ->envname("NORMCTL_TIMEOUT")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_flag("--tls", client_options.use_tls, "Connect with TLS (system roots unless --tls-ca)");
  app.add_option("--tls-ca", client_options.tls_ca_file,
                 "PEM file of the CA to trust (implies --tls)")
      ->envname("NORMCTL_TLS_CA");
  app.add_option("--tls-cert", client_options.tls_cert_file,
                 "PEM client certificate for mutual TLS (implies --tls)")
      ->envname("NORMCTL_TLS_CERT");
  app.add_option("--tls-key", client_options.tls_key_file, "PEM key of --tls-cert")
      ->envname("NORMCTL_TLS_KEY");
  app.add_option("--tls-server-name", client_options.tls_server_name,
                 "Name to verify in the server certificate (default: the host in --server)");
  app.add_option("--token-file", token_file, "File holding the bearer token sent with every call")
      ->envname("NORMCTL_TOKEN_FILE");
  std::string tenant;
  app.add_option("--tenant", tenant,
                 "Act on this tenant's models: ids become TENANT/ID (an admin's way to reach "
                 "another tenant; your own tenant is implied without it); list shows only its "
                 "models")
      ->envname("NORMCTL_TENANT");

  Args args;
  std::function<int(normd::client::Client&, const Args&, std::ostream&)> run;
  auto command = [&](const char* name, const char* help, auto fn) {
    CLI::App* sub = app.add_subcommand(name, help);
    sub->callback([&run, fn] { run = fn; });
    return sub;
  };
  auto add_id = [&](CLI::App* sub) { sub->add_option("ID", args.id, "Model id")->required(); };

  CLI::App* create =
      command("create", "Create a model from a ModelSpec JSON file", normctl::RunCreate);
  create->add_option("--spec", args.spec_path, "ModelSpec in protobuf JSON (client/examples/)")
      ->required();
  create->add_option("--id", args.id, "Model id (default: chosen by the server)");
  create->add_flag("--json", args.json, "Print the created Model as JSON");

  CLI::App* list = command("list", "List the models", normctl::RunList);
  list->add_flag("--json", args.json, "Print JSON");

  CLI::App* get =
      command("get", "Show a model: mode, step, layers, BatchNorm status", normctl::RunGet);
  add_id(get);
  get->add_flag("--json", args.json, "Print the Model as JSON");

  add_id(command("delete", "Delete a model", normctl::RunDelete));

  CLI::App* mode = command("mode", "Switch a model between train and eval mode", normctl::RunMode);
  add_id(mode);
  mode->add_option("MODE", args.mode, "train | eval")
      ->required()
      ->check(CLI::IsMember({"train", "eval"}));
  CLI::Option* freeze = mode->add_flag("--freeze-running-stats", args.freeze,
                                       "Keep BatchNorm running statistics fixed while training");
  mode->add_flag("--no-freeze-running-stats", args.unfreeze, "Let running statistics update again")
      ->excludes(freeze);

  add_id(command("reset-stats", "Reset the BatchNorm running statistics", normctl::RunResetStats));

  CLI::App* train = command("train", "Train on a CSV over a TrainStream", normctl::RunTrain);
  add_id(train);
  train->add_option("--data", args.data, "Training CSV")->required();
  train->add_option("--label-column", args.label_column,
                    "Label (classification) or target (regression) column: 0-based index, "
                    "negative from the end, or header name (default: last)");
  train->add_option("--epochs", args.epochs, "Epochs")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  train->add_option("--batch", args.batch, "Batch size")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  train->add_flag("--shuffle", args.shuffle, "Shuffle the samples every epoch");
  train->add_option("--seed", args.seed, "Shuffle seed")->capture_default_str();
  train->add_option("--val", args.val, "Validation CSV, evaluated after every epoch");
  train->add_option("--progress", args.progress, "auto | bar | lines | off")->capture_default_str();

  CLI::App* eval =
      command("eval", "Loss and accuracy on a labelled CSV (changes nothing)", normctl::RunEval);
  add_id(eval);
  eval->add_option("--data", args.data, "Labelled CSV")->required();
  eval->add_option("--label-column", args.label_column, "Label column (default: last)");
  eval->add_option("--batch", args.infer_batch, "Samples per request")->check(CLI::PositiveNumber);

  CLI::App* predict =
      command("predict", "Forward a CSV and write the outputs as CSV", normctl::RunPredict);
  add_id(predict);
  predict->add_option("--data", args.data, "Input CSV (features only, unless --label-column)")
      ->required();
  predict->add_option("--label-column", args.label_column, "A column to ignore (e.g. the label)");
  predict->add_option("--out", args.out, "Output file (default: stdout)");
  predict->add_flag("--argmax", args.argmax, "Write the predicted class instead of the outputs");
  predict->add_option("--batch", args.infer_batch, "Samples per request")
      ->check(CLI::PositiveNumber);

  CLI::App* adapt = command(
      "adapt", "Re-estimate the BatchNorm statistics from unlabelled data (AdaptStatistics)",
      normctl::RunAdapt);
  add_id(adapt);
  adapt->add_option("--data", args.data, "Input CSV (features only, unless --label-column)")
      ->required();
  adapt->add_option("--label-column", args.label_column, "A column to ignore (e.g. the label)");
  adapt->add_option("--batch", args.infer_batch, "Samples per streamed batch")
      ->check(CLI::PositiveNumber);

  CLI::App* inspect =
      command("inspect", "Per-layer mean/std of activations in and out, for one batch",
              normctl::RunInspect);
  add_id(inspect);
  inspect->add_option("--data", args.data, "Input CSV")->required();
  inspect->add_option("--label-column", args.label_column, "A column to ignore (e.g. the label)");
  inspect->add_option("--rows", args.rows, "Batch size (first rows of the file)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  CLI::App* lr =
      command("lr", "Change the learning rate, keeping the optimizer state", normctl::RunLr);
  add_id(lr);
  lr->add_option("VALUE", args.lr, "New learning rate")->required();

  // recipe: the values land in temporaries; main copies the given ones into Args' optionals.
  int64_t warmup_steps = 0, step_lr = 0, cosine = 0;
  double warmup_start_factor = 0, gamma = 0, eta_min = 0, clip_grad_norm = 0;
  CLI::App* recipe = command(
      "recipe",
      "Set the learning-rate schedule, gradient clipping and weight-decay groups "
      "(UpdateOptimizer; a changed schedule starts from its step 0)",
      normctl::RunRecipe);
  add_id(recipe);
  CLI::Option* o_warmup = recipe->add_option(
      "--warmup", warmup_steps, "Linear warm-up over STEPS steps (LinearLR, end_factor 1)");
  CLI::Option* o_warmup_sf =
      recipe->add_option("--warmup-start-factor", warmup_start_factor,
                         "The warm-up's first factor of the lr, in (0, 1] (default 1/3)")
          ->needs(o_warmup);
  CLI::Option* o_step =
      recipe->add_option("--step-lr", step_lr, "StepLR after the warm-up: decay every STEP_SIZE");
  CLI::Option* o_gamma =
      recipe->add_option("--gamma", gamma, "StepLR's factor (default 0.1)")->needs(o_step);
  CLI::Option* o_cosine = recipe->add_option(
      "--cosine", cosine, "CosineAnnealingLR after the warm-up over T_MAX steps")->excludes(o_step);
  CLI::Option* o_eta = recipe->add_option("--eta-min", eta_min, "The cosine's floor (default 0)")
                           ->needs(o_cosine);
  CLI::Option* o_no_schedule =
      recipe->add_flag("--no-schedule", args.no_schedule, "No schedule: the lr throughout");
  o_no_schedule->excludes(o_warmup)->excludes(o_step)->excludes(o_cosine);
  CLI::Option* o_clip = recipe->add_option("--clip-grad-norm", clip_grad_norm,
                                           "clip_grad_norm_ with this max_norm before each step");
  recipe->add_flag("--no-clip", args.no_clip, "No gradient clipping")->excludes(o_clip);
  CLI::Option* o_nodecay =
      recipe->add_flag("--no-decay-norm-bias", args.no_decay_norm_bias,
                       "No weight decay on norm-layer parameters and biases");
  recipe->add_flag("--decay-all", args.decay_all, "Weight decay on every parameter")
      ->excludes(o_nodecay);

  CLI::App* health =
      command("health", "Check the server's gRPC health (exit 0 when SERVING)", normctl::RunHealth);
  health->add_option("--service", args.service, "Service name (default: the whole server)");

  command("replicas",
          "Data-parallel jobs: compare every rank's replicas bit for bit (exit 0 when equal)",
          normctl::RunReplicas);

  CLI::App* layer = command("layer", "Freeze or unfreeze layers, make them (un)trainable",
                            normctl::RunLayer);
  add_id(layer);
  layer->add_option("LAYER", args.layers,
                    "Layer names or paths: an index (3), a layer in a residual block (4.body.1), "
                    "a whole block (4)")
      ->required();
  CLI::Option* lf = layer->add_flag("--freeze", args.layer_freeze,
                                    "Normalise with the running statistics in train mode too "
                                    "and stop updating them (bn.eval() in PyTorch)");
  layer->add_flag("--unfreeze", args.layer_unfreeze, "Back to train-mode behaviour")->excludes(lf);
  CLI::Option* lt = layer->add_flag("--trainable", args.trainable,
                                    "The layer's parameters are trained (the default)");
  layer->add_flag("--no-trainable", args.untrainable,
                  "No gradient, optimizer update or weight decay for the layer's parameters "
                  "(requires_grad_(False))")
      ->excludes(lt);

  CLI::App* fold = command("fold", "Fold BatchNorm into the preceding Linear/Conv2d (inference)",
                           normctl::RunFold);
  add_id(fold);
  fold->add_option("--as", args.fold_as, "Also create the folded model under this id");
  fold->add_flag("--json", args.json, "Print the created Model (or the folded spec) as JSON");

  CLI::App* demo = command("demo", "The BatchNorm drift story in about a minute", normctl::RunDemo);
  demo->add_option("--metrics-url", args.metrics_url,
                   "The server's /metrics URL (to show its drift series)")
      ->envname("NORMCTL_METRICS_URL");
  demo->add_option("--id", args.id, "Model id (default: demo)");
  demo->add_option("--out-dir", args.out_dir, "Write the demo's CSV datasets here");
  demo->add_option("--epochs", args.demo_epochs, "Epochs")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  demo->add_option("--samples", args.samples, "Training samples")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  demo->add_option("--serve-seconds", args.serve_seconds, "Length of each live serving phase")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  demo->add_option("--progress", args.progress, "auto | bar | lines | off");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? normctl::kExitOk : normctl::kExitUsage;
  }
  if (o_warmup->count() > 0) args.warmup_steps = warmup_steps;
  if (o_warmup_sf->count() > 0) args.warmup_start_factor = warmup_start_factor;
  if (o_step->count() > 0) args.step_lr = step_lr;
  if (o_gamma->count() > 0) args.gamma = gamma;
  if (o_cosine->count() > 0) args.cosine = cosine;
  if (o_eta->count() > 0) args.eta_min = eta_min;
  if (o_clip->count() > 0) args.clip_grad_norm = clip_grad_norm;

  try {
    client_options.timeout =
        std::chrono::milliseconds(static_cast<int64_t>(std::ceil(timeout_seconds * 1000)));
    if (!client_options.tls_ca_file.empty() || !client_options.tls_cert_file.empty()) {
      client_options.use_tls = true;
    }
    if (!token_file.empty()) client_options.auth_token = ReadToken(token_file);
    if (!tenant.empty()) {
      // The server resolves "TENANT/ID" (README, Tenants); a qualified id given as is stays.
      auto qualify = [&tenant](std::string* id) {
        if (!id->empty() && id->find('/') == std::string::npos) *id = tenant + "/" + *id;
      };
      qualify(&args.id);
      qualify(&args.fold_as);
      args.tenant = tenant;
    }
    normd::client::Client client(client_options);
    return run(client, args, std::cout);
  } catch (const normd::client::Error& e) {
    std::cout.flush();
    std::cerr << "normctl: " << e.what() << '\n';
    return normctl::kExitError;
  } catch (const normctl::InputError& e) {
    std::cout.flush();
    std::cerr << "normctl: " << e.what() << '\n';
    return normctl::kExitUsage;
  }
}
