// Plain aligned text tables for normctl's output.
#ifndef NORMD_CLIENT_NORMCTL_TABLE_H_
#define NORMD_CLIENT_NORMCTL_TABLE_H_

#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace normctl {

// Collects rows, then prints them with columns padded to their widest cell: text left-aligned,
// numbers right-aligned, the header underlined.
class TextTable {
 public:
  explicit TextTable(std::vector<std::string> header) : header_(std::move(header)) {}
  void AddRow(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  bool empty() const { return rows_.empty(); }
  void Print(std::ostream& out, const std::string& indent = "") const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// Fixed-point / general formatting helpers for table cells.
std::string Fixed(double v, int digits);
std::string General(double v, int significant = 4);

}  // namespace normctl

#endif  // NORMD_CLIENT_NORMCTL_TABLE_H_
