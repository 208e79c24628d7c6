// Shapes and float32 tensors.
//
// Layout: every tensor is dense, contiguous and row-major (C order), the first dimension being
// the batch. A (N, C, H, W) tensor stores sample n, channel c at offset ((n*C + c)*H + h)*W + w,
// exactly like a contiguous PyTorch tensor and like the wire format (proto Tensor), so a batch
// received from a client is used in place through a ConstTensorView / Eigen Map, without a copy.
//
// Viewed as a matrix, a tensor is (shape[0], size/shape[0]) row-major: one sample per row.
#ifndef NORMD_CORE_TENSOR_H_
#define NORMD_CORE_TENSOR_H_

#include <Eigen/Core>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace normd {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMajorMatrix>;
using ConstMatrixMap = Eigen::Map<const RowMajorMatrix>;
using VectorMap = Eigen::Map<Eigen::VectorXf>;
using ConstVectorMap = Eigen::Map<const Eigen::VectorXf>;

// Largest rank the library handles: a batch dimension plus up to five per-sample dimensions.
constexpr int kMaxRank = 6;

// A small fixed-capacity shape (no heap allocation). Dimensions are non-negative.
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);

  // Fails (returns false) when dims has more than kMaxRank entries.
  static bool FromVector(const std::vector<int64_t>& dims, Shape* out);
  std::vector<int64_t> ToVector() const;

  int rank() const { return rank_; }
  int64_t operator[](int i) const { return dims_[i]; }
  int64_t& operator[](int i) { return dims_[i]; }
  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + rank_; }

  // REQUIRES: rank() < kMaxRank.
  void push_back(int64_t d) { dims_[rank_++] = d; }

  // Product of the dimensions (1 for rank 0). Saturates at INT64_MAX instead of overflowing,
  // so a hostile shape is rejected by a size limit rather than wrapping around.
  int64_t NumElements() const;

  // (n, *this): the batch shape for per-sample shape *this.
  Shape WithBatch(int64_t n) const;
  // All dimensions but the first. REQUIRES: rank() >= 1.
  Shape DropFirst() const;

  std::string ToString() const;  // "(2, 3, 4)"

  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }

 private:
  std::array<int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

// Multiplies a*b, saturating at INT64_MAX. REQUIRES: a, b >= 0.
int64_t SaturatingMul(int64_t a, int64_t b);

// A read-only, non-owning view of a row-major float tensor (for example a request's payload).
struct ConstTensorView {
  const float* data = nullptr;
  Shape shape;

  int64_t size() const { return shape.NumElements(); }
  int64_t rows() const { return shape.rank() == 0 ? 1 : shape[0]; }
  // Values per row; for a batch of no rows still the per-row count (a data-parallel shard
  // may be empty and its matrix products must keep their inner dimension).
  int64_t cols() const { return rows() == 0 ? shape.DropFirst().NumElements() : size() / rows(); }
  ConstMatrixMap matrix() const { return ConstMatrixMap(data, rows(), cols()); }
};

// An owning, contiguous float32 tensor. Resize keeps the allocation when it is large enough,
// so buffers sized once for a batch shape are reused step after step without allocating.
// Not thread-safe; callers synchronise.
class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(const Shape& shape, float fill = 0.0f);

  // Changes the shape; contents become unspecified. Allocates only when growing past capacity.
  void Resize(const Shape& shape);
  void SetZero();
  void Fill(float v);

  const Shape& shape() const { return shape_; }
  int64_t size() const { return size_; }
  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }

  int64_t rows() const { return shape_.rank() == 0 ? 1 : shape_[0]; }
  int64_t cols() const { return rows() == 0 ? shape_.DropFirst().NumElements() : size_ / rows(); }
  MatrixMap matrix() { return MatrixMap(data(), rows(), cols()); }
  ConstMatrixMap matrix() const { return ConstMatrixMap(data(), rows(), cols()); }
  VectorMap flat() { return VectorMap(data(), size_); }
  ConstVectorMap flat() const { return ConstVectorMap(data(), size_); }

  ConstTensorView view() const { return ConstTensorView{data(), shape_}; }

  // True when every element is finite (no NaN/Inf).
  bool AllFinite() const;

 private:
  Shape shape_;
  int64_t size_ = 0;
  // Aligned to Eigen's largest packet: Eigen peels unaligned leading elements of a vectorised
  // expression into scalar code with a different summation order, so results would otherwise
  // depend, in the last bit, on where the allocator happened to place a buffer.
  std::vector<float, Eigen::aligned_allocator<float>> data_;
};

// True when every one of the n values is finite.
bool AllFinite(const float* data, int64_t n);

}  // namespace normd

#endif  // NORMD_CORE_TENSOR_H_
