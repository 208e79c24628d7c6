// normctl's subcommands. main.cc parses flags into Args and calls one Run* function; each
// returns the process exit code and throws normd::client::Error (server said no) or InputError
// (bad local input), which main.cc reports.
#ifndef NORMD_CLIENT_NORMCTL_COMMANDS_H_
#define NORMD_CLIENT_NORMCTL_COMMANDS_H_

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "client/normd_client.h"

namespace normctl {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;  // the server refused or failed (its message is on stderr)
constexpr int kExitUsage = 2;  // bad flags or local input (file, CSV, JSON)

// Every subcommand's flags; each subcommand reads the fields it defines.
struct Args {
  std::string id;            // as the server resolves it: ID, or TENANT/ID (--tenant)
  std::string tenant;        // --tenant: list shows only this tenant's models
  std::string spec_path;     // create
  bool json = false;         // get, list, create: print protobuf JSON
  std::string mode;          // mode: "train" | "eval"
  bool freeze = false;       // mode --freeze-running-stats
  bool unfreeze = false;     // mode --no-freeze-running-stats
  std::string data;          // train, eval, predict, inspect
  std::string val;           // train --val
  std::string label_column;  // "" = none (predict, inspect) / default last (train, eval)
  int epochs = 1;
  int64_t batch = 32;          // train
  int64_t infer_batch = 1024;  // eval, predict: samples per request
  bool shuffle = false;
  uint64_t seed = 1;
  std::string progress = "auto";
  std::string out;           // predict --out
  bool argmax = false;       // predict --argmax
  int64_t rows = 256;        // inspect --rows
  double lr = 0;             // lr VALUE
  std::string service;       // health --service
  std::string metrics_url;   // demo
  std::string out_dir;       // demo: where to write its CSV files
  int64_t samples = 50000;   // demo: training samples
  int demo_epochs = 6;       // demo: epochs
  double serve_seconds = 8;  // demo: length of each live serving phase
  std::vector<std::string> layers;  // layer: labels (name or path)
  bool layer_freeze = false;        // layer --freeze
  bool layer_unfreeze = false;      // layer --unfreeze
  bool trainable = false;           // layer --trainable
  bool untrainable = false;         // layer --no-trainable
  std::string fold_as;              // fold --as
  // recipe: each set only when its flag was given.
  std::optional<int64_t> warmup_steps;          // --warmup STEPS
  std::optional<double> warmup_start_factor;    // --warmup-start-factor
  std::optional<int64_t> step_lr;               // --step-lr STEP_SIZE
  std::optional<double> gamma;                  // --gamma
  std::optional<int64_t> cosine;                // --cosine T_MAX
  std::optional<double> eta_min;                // --eta-min
  bool no_schedule = false;                     // --no-schedule
  std::optional<double> clip_grad_norm;         // --clip-grad-norm MAX
  bool no_clip = false;                         // --no-clip
  bool no_decay_norm_bias = false;              // --no-decay-norm-bias
  bool decay_all = false;                       // --decay-all
};

int RunCreate(normd::client::Client& client, const Args& args, std::ostream& out);
int RunList(normd::client::Client& client, const Args& args, std::ostream& out);
int RunGet(normd::client::Client& client, const Args& args, std::ostream& out);
int RunDelete(normd::client::Client& client, const Args& args, std::ostream& out);
int RunMode(normd::client::Client& client, const Args& args, std::ostream& out);
int RunResetStats(normd::client::Client& client, const Args& args, std::ostream& out);
int RunTrain(normd::client::Client& client, const Args& args, std::ostream& out);
int RunEval(normd::client::Client& client, const Args& args, std::ostream& out);
int RunPredict(normd::client::Client& client, const Args& args, std::ostream& out);
int RunInspect(normd::client::Client& client, const Args& args, std::ostream& out);
int RunLr(normd::client::Client& client, const Args& args, std::ostream& out);
int RunHealth(normd::client::Client& client, const Args& args, std::ostream& out);
// Every rank's digest of its replicas; exit 0 when all ranks agree (data-parallel jobs).
int RunReplicas(normd::client::Client& client, const Args& args, std::ostream& out);
int RunDemo(normd::client::Client& client, const Args& args, std::ostream& out);
int RunLayer(normd::client::Client& client, const Args& args, std::ostream& out);
int RunFold(normd::client::Client& client, const Args& args, std::ostream& out);
int RunAdapt(normd::client::Client& client, const Args& args, std::ostream& out);
int RunRecipe(normd::client::Client& client, const Args& args, std::ostream& out);

// Display helpers shared by commands and the demo.
std::string ModeName(normd::v1::Mode mode);                // "train" | "eval" | "unspecified"
std::string LayerKind(const normd::v1::LayerSpec& layer);  // "linear", "batch_norm1d", ...
std::string LayerLabel(const normd::v1::ModelSpec& spec, int index);  // name or index
// One line for `get`, `lr` and `recipe`: the kind ("sgd", "adam", "adamw"; "none" without one)
// with lr (sgd: and momentum, and nesterov when set) and weight_decay when not 0, then, each
// only when set, the schedule (an unset start_factor or gamma shows the server's default),
// clipping and the no-decay groups. E.g. "sgd lr=0.1 momentum=0.9, warm-up 5 steps from 0.1x
// then cosine t_max=45 eta_min=0, clip grad norm 1, no weight decay on norm/bias".
std::string OptimizerString(const normd::v1::OptimizerSpec& optimizer);
void PrintBatchNormTable(const normd::v1::Model& model, std::ostream& out);

// One layer of a spec's tree (residual blocks hold layers): its path ("3", "4.body.1", the
// server's state_dict prefix) and label (its name, or its path), in the server's order.
struct SpecLayer {
  std::string path;
  std::string label;
  const normd::v1::LayerSpec* layer;
};
std::vector<SpecLayer> SpecLayers(const normd::v1::ModelSpec& spec);

}  // namespace normctl

#endif  // NORMD_CLIENT_NORMCTL_COMMANDS_H_
