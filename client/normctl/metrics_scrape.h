// Reading a Prometheus /metrics page: an HTTP GET (libcurl) and a parser for the text format's
// sample lines, enough for normctl to show the figures the server exports.
#ifndef NORMD_CLIENT_NORMCTL_METRICS_SCRAPE_H_
#define NORMD_CLIENT_NORMCTL_METRICS_SCRAPE_H_

#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace normctl {

struct MetricSample {
  std::string name;  // e.g. "normd_bn_mean_shift_sum"
  std::map<std::string, std::string> labels;
  double value = 0;
};

// GETs `url`; throws InputError when the request fails or the status is not 200.
std::string HttpGet(const std::string& url, std::chrono::milliseconds timeout);

// Parses the sample lines of the Prometheus text exposition format (comments skipped).
std::vector<MetricSample> ParseMetrics(const std::string& text);

// Sum of the values of samples named `name` whose labels include every pair in `match`.
double SumMetric(const std::vector<MetricSample>& samples, const std::string& name,
                 const std::map<std::string, std::string>& match);

}  // namespace normctl

#endif  // NORMD_CLIENT_NORMCTL_METRICS_SCRAPE_H_
