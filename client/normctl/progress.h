// Training progress display: a redrawn bar on a terminal, plain periodic lines otherwise.
#ifndef NORMD_CLIENT_NORMCTL_PROGRESS_H_
#define NORMD_CLIENT_NORMCTL_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <ostream>
#include <string>

namespace normctl {

enum class ProgressStyle {
  kAuto,   // kBar when stdout is a terminal, kLines otherwise
  kBar,    // one line redrawn in place (at most 10 times a second)
  kLines,  // a plain line every couple of seconds, for logs and pipes
  kOff,
};

// Parses "auto" | "bar" | "lines" | "off"; throws InputError otherwise.
ProgressStyle ParseProgressStyle(const std::string& s);

// Shows one epoch's progress. Not thread-safe.
class EpochProgress {
 public:
  EpochProgress(std::ostream& out, ProgressStyle style, int epoch, int epochs, int64_t total);

  // samples: done so far in this epoch; loss: the epoch's running (sample-weighted) mean loss.
  void Update(int64_t samples, double loss);
  // Clears the bar (if any) so the epoch summary can be printed on a clean line.
  void Done();

  double elapsed_seconds() const;

 private:
  void Draw(int64_t samples, double loss);

  std::ostream& out_;
  ProgressStyle style_;
  int epoch_;
  int epochs_;
  int64_t total_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
  bool drawn_ = false;
};

}  // namespace normctl

#endif  // NORMD_CLIENT_NORMCTL_PROGRESS_H_
