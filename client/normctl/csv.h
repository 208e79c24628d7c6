// CSV files of numbers for normctl: reading datasets, writing predictions.
//
// A file is comma-separated, one sample per line. The first line is a header when any of its
// fields is not a number; otherwise every line is data. Blank lines are skipped. Every data line
// must have the same number of fields, each a finite float.
#ifndef NORMD_CLIENT_NORMCTL_CSV_H_
#define NORMD_CLIENT_NORMCTL_CSV_H_

#include <cstdint>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace normctl {

// A problem with a local input (file, flag value) rather than with the server: normctl reports
// it and exits with kExitUsage.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CsvTable {
  std::vector<std::string> header;  // empty when the file has none
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> values;  // rows * cols, row-major
};

// Throws InputError naming the file, line and column of the first problem.
CsvTable ReadCsv(const std::string& path);

// Resolves a column given as a 0-based index, a negative index counted from the end (-1 is the
// last column) or a header name. Throws InputError when it names no column.
int64_t ResolveColumn(const CsvTable& table, const std::string& spec);

// The table without one column (features) and that column alone (labels or targets).
// column < 0 keeps every column as a feature and leaves `column_values` empty.
void SplitColumn(const CsvTable& table, int64_t column, std::vector<float>* features,
                 std::vector<float>* column_values);

// Writes `header` (when non-empty) and rows of `cols` values each.
void WriteCsv(std::ostream& out, const std::vector<std::string>& header, const float* values,
              int64_t rows, int64_t cols);

}  // namespace normctl

#endif  // NORMD_CLIENT_NORMCTL_CSV_H_
