// group_sizes -> row offsets, validated: shared by every op of the family that splits x's rows
// into groups (GroupedMatMul, GroupedMatMulBias, GroupedMatMulWeightGrad, GroupedLayerNorm).
#ifndef TF_OPS_GROUPED_MATMUL_KERNELS_GROUP_OFFSETS_H_
#define TF_OPS_GROUPED_MATMUL_KERNELS_GROUP_OFFSETS_H_

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {

// Checks group_sizes against G and T and turns it into G + 1 row offsets. Every size is
// checked before it is added, so no sum overflows and no offset exceeds T.
template <typename Tidx>
inline absl::Status GroupOffsets(const std::string& op, const Tensor& group_sizes, int64_t groups,
                          int64_t rows, std::vector<int64_t>* offsets) {
  if (group_sizes.dims() != 1) {
    return errors::InvalidArgument(op, ": group_sizes must be a vector [G], got shape ",
                                   group_sizes.shape().DebugString());
  }
  if (group_sizes.dim_size(0) != groups) {
    return errors::InvalidArgument(op, ": group_sizes has ", group_sizes.dim_size(0),
                                   " entries but w has G = ", groups,
                                   " groups; they must match");
  }
  const auto sizes = group_sizes.flat<Tidx>();
  offsets->assign(groups + 1, 0);
  int64_t total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = static_cast<int64_t>(sizes(g));
    if (size < 0) {
      return errors::InvalidArgument(op, ": group_sizes[", g, "] = ", size,
                                     " is negative; every group size must be >= 0");
    }
    if (size > rows - total) {
      // Report the full sum when it is representable, to name both sides of the mismatch.
      int64_t sum = total;
      bool overflow = false;
      for (int64_t h = g; h < groups; ++h) {
        const int64_t s = static_cast<int64_t>(sizes(h));
        if (s < 0) {
          return errors::InvalidArgument(op, ": group_sizes[", h, "] = ", s,
                                         " is negative; every group size must be >= 0");
        }
        if (s > std::numeric_limits<int64_t>::max() - sum) overflow = true;
        if (!overflow) sum += s;
      }
      return errors::InvalidArgument(
          op, ": group_sizes sum to ", overflow ? std::string("more than 2^63") : std::to_string(sum),
          " but x has T = ", rows, " rows; the sizes must add up to x's first dimension");
    }
    total += size;
    (*offsets)[g + 1] = total;
  }
  if (total != rows) {
    return errors::InvalidArgument(op, ": group_sizes sum to ", total, " but x has T = ", rows,
                                   " rows; the sizes must add up to x's first dimension");
  }
  return absl::OkStatus();
}

}  // namespace tensorflow

#endif  // TF_OPS_GROUPED_MATMUL_KERNELS_GROUP_OFFSETS_H_
