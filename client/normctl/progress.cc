#include "client/normctl/progress.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "client/normctl/csv.h"

namespace normctl {
namespace {

constexpr int kBarWidth = 30;

bool StdoutIsTerminal() {
  const char* term = std::getenv("TERM");
  return isatty(STDOUT_FILENO) && !(term && std::strcmp(term, "dumb") == 0);
}

}  // namespace

ProgressStyle ParseProgressStyle(const std::string& s) {
  if (s == "auto") return ProgressStyle::kAuto;
  if (s == "bar") return ProgressStyle::kBar;
  if (s == "lines") return ProgressStyle::kLines;
  if (s == "off") return ProgressStyle::kOff;
  throw InputError("--progress must be auto, bar, lines or off (got '" + s + "')");
}

EpochProgress::EpochProgress(std::ostream& out, ProgressStyle style, int epoch, int epochs,
                             int64_t total)
    : out_(out),
      style_(style == ProgressStyle::kAuto
                 ? (StdoutIsTerminal() ? ProgressStyle::kBar : ProgressStyle::kLines)
                 : style),
      epoch_(epoch),
      epochs_(epochs),
      total_(total),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

double EpochProgress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void EpochProgress::Update(int64_t samples, double loss) {
  const auto now = std::chrono::steady_clock::now();
  const auto interval = style_ == ProgressStyle::kBar ? std::chrono::milliseconds(100)
                                                      : std::chrono::milliseconds(2000);
  if (style_ == ProgressStyle::kOff) return;
  if (samples < total_ && now - last_draw_ < interval) return;
  // Plain lines skip the final update: the epoch summary follows immediately.
  if (style_ == ProgressStyle::kLines && samples >= total_) return;
  last_draw_ = now;
  Draw(samples, loss);
}

void EpochProgress::Draw(int64_t samples, double loss) {
  const double seconds = elapsed_seconds();
  const double rate = seconds > 0 ? samples / seconds : 0.0;
  const double fraction = total_ > 0 ? static_cast<double>(samples) / total_ : 1.0;
  char text[256];
  if (style_ == ProgressStyle::kBar) {
    const int filled = static_cast<int>(fraction * kBarWidth + 0.5);
    std::string bar(filled, '#');
    bar.resize(kBarWidth, '.');
    std::snprintf(text, sizeof text,
                  "\repoch %d/%d [%s] %3.0f%% %lld/%lld  %8.0f samples/s  loss %.4f", epoch_,
                  epochs_, bar.c_str(), fraction * 100, static_cast<long long>(samples),
                  static_cast<long long>(total_), rate, loss);
    drawn_ = true;
  } else {
    std::snprintf(text, sizeof text, "epoch %d/%d  %3.0f%%  %lld/%lld  %.0f samples/s  loss %.4f\n",
                  epoch_, epochs_, fraction * 100, static_cast<long long>(samples),
                  static_cast<long long>(total_), rate, loss);
  }
  out_ << text << std::flush;
}

void EpochProgress::Done() {
  if (drawn_) {
    out_ << '\r' << std::string(100, ' ') << '\r' << std::flush;
    drawn_ = false;
  }
}

}  // namespace normctl
