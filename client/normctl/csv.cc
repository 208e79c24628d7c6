#include "client/normctl/csv.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iomanip>

namespace normctl {
namespace {

std::string Trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '"')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r' || s[e - 1] == '"')) {
    --e;
  }
  return s.substr(b, e - b);
}

std::vector<std::string> SplitFields(const std::string& line) {
  std::vector<std::string> fields;
  size_t start = 0;
  while (true) {
    const size_t comma = line.find(',', start);
    fields.push_back(Trim(line.substr(start, comma - start)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return fields;
}

bool ParseFloat(const std::string& s, float* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  const float v = std::strtof(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return false;
  *out = v;
  return true;
}

bool IsBlank(const std::string& line) {
  return line.find_first_not_of(" \t\r") == std::string::npos;
}

}  // namespace

CsvTable ReadCsv(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError("cannot open '" + path + "'");
  CsvTable table;
  std::string line;
  int64_t line_no = 0;
  bool first = true;
  while (std::getline(in, line)) {
    ++line_no;
    if (IsBlank(line)) continue;
    std::vector<std::string> fields = SplitFields(line);
    if (first) {
      first = false;
      table.cols = static_cast<int64_t>(fields.size());
      float unused;
      for (const std::string& f : fields) {
        if (!ParseFloat(f, &unused)) {
          table.header = fields;
          break;
        }
      }
      if (!table.header.empty()) continue;
    }
    if (static_cast<int64_t>(fields.size()) != table.cols) {
      throw InputError(path + ":" + std::to_string(line_no) + ": expected " +
                       std::to_string(table.cols) + " columns, found " +
                       std::to_string(fields.size()));
    }
    for (size_t c = 0; c < fields.size(); ++c) {
      float v;
      if (!ParseFloat(fields[c], &v) || !std::isfinite(v)) {
        throw InputError(path + ":" + std::to_string(line_no) + ": column " + std::to_string(c) +
                         ": '" + fields[c] + "' is not a finite number");
      }
      table.values.push_back(v);
    }
    ++table.rows;
  }
  if (in.bad()) throw InputError("error reading '" + path + "'");
  if (table.rows == 0) throw InputError("'" + path + "' holds no data rows");
  return table;
}

int64_t ResolveColumn(const CsvTable& table, const std::string& spec) {
  char* end = nullptr;
  const long long n = std::strtoll(spec.c_str(), &end, 10);
  if (!spec.empty() && end == spec.c_str() + spec.size()) {
    const int64_t column = n < 0 ? table.cols + n : n;
    if (column < 0 || column >= table.cols) {
      throw InputError("column " + spec + " is out of range: the data has " +
                       std::to_string(table.cols) + " columns");
    }
    return column;
  }
  for (size_t c = 0; c < table.header.size(); ++c) {
    if (table.header[c] == spec) return static_cast<int64_t>(c);
  }
  throw InputError("no column named '" + spec + "'" +
                   (table.header.empty() ? " (the data has no header)" : ""));
}

void SplitColumn(const CsvTable& table, int64_t column, std::vector<float>* features,
                 std::vector<float>* column_values) {
  features->clear();
  column_values->clear();
  const int64_t feature_cols = column < 0 ? table.cols : table.cols - 1;
  features->reserve(table.rows * feature_cols);
  if (column >= 0) column_values->reserve(table.rows);
  for (int64_t r = 0; r < table.rows; ++r) {
    const float* row = table.values.data() + r * table.cols;
    for (int64_t c = 0; c < table.cols; ++c) {
      if (c == column) {
        column_values->push_back(row[c]);
      } else {
        features->push_back(row[c]);
      }
    }
  }
}

void WriteCsv(std::ostream& out, const std::vector<std::string>& header, const float* values,
              int64_t rows, int64_t cols) {
  for (size_t c = 0; c < header.size(); ++c) out << (c ? "," : "") << header[c];
  if (!header.empty()) out << '\n';
  out << std::setprecision(9);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out << (c ? "," : "") << values[r * cols + c];
    out << '\n';
  }
}

}  // namespace normctl
