#include "client/normctl/table.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace normctl {
namespace {

bool LooksNumeric(const std::string& s) {
  if (s.empty()) return false;
  char* end = nullptr;
  std::strtod(s.c_str(), &end);
  return *end == '\0' || *end == '%' || *end == 'x';
}

}  // namespace

void TextTable::Print(std::ostream& out, const std::string& indent) const {
  std::vector<size_t> width(header_.size(), 0);
  for (size_t c = 0; c < header_.size(); ++c) width[c] = header_[c].size();
  for (const auto& row : rows_) {
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], row[c].size());
    }
  }
  auto print_row = [&](const std::vector<std::string>& row, bool is_header) {
    std::string line = indent;
    for (size_t c = 0; c < width.size(); ++c) {
      const std::string cell = c < row.size() ? row[c] : "";
      const std::string pad(width[c] - cell.size(), ' ');
      const bool right = !is_header && c > 0 && LooksNumeric(cell);
      line += right ? pad + cell : cell + pad;
      if (c + 1 < width.size()) line += "  ";
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out << line << '\n';
  };
  print_row(header_, true);
  std::string rule = indent;
  for (size_t c = 0; c < width.size(); ++c) {
    rule += std::string(width[c], '-') + (c + 1 < width.size() ? "  " : "");
  }
  out << rule << '\n';
  for (const auto& row : rows_) print_row(row, false);
}

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string General(double v, int significant) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", significant, v);
  return buf;
}

}  // namespace normctl
