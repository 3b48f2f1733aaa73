// Shared pieces of the Invoke kernels: the residual list variant and the registry of live calls.
#ifndef TFWEAVE_TF_OPS_INVOKE_KERNELS_INVOKE_H_
#define TFWEAVE_TF_OPS_INVOKE_KERNELS_INVOKE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "tensorflow/core/framework/cancellation.h"
#include "tensorflow/core/framework/function.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/variant_tensor_data.h"
#include "tensorflow/core/platform/mutex.h"

namespace tensorflow {
namespace tfweave {

// The forward values one recursion level keeps for its backward pass. Tensors are refcounted
// buffers, so packing and unpacking copies no data.
struct ResidualList {
  std::vector<Tensor> values;

  static constexpr const char kTypeName[] = "tfweave.InvokeResiduals";
  std::string TypeName() const { return kTypeName; }
  void Encode(VariantTensorData* data) const {
    data->set_type_name(TypeName());
    for (const Tensor& t : values) *data->add_tensors() = t;
  }
  bool Decode(VariantTensorData data) {
    values = data.tensors();
    return true;
  }
  std::string DebugString() const {
    return "InvokeResiduals<" + std::to_string(values.size()) + " tensors>";
  }
};

// State shared by every call of one top-level recursion: its root cancellation manager (which
// stops all outstanding calls once one fails) and the first real error, reported instead of the
// Cancelled errors that stopping the siblings produces.
struct RecursionRoot {
  CancellationManager* cancellation = nullptr;
  mutex mu;
  absl::Status first_error TF_GUARDED_BY(mu);

  void RecordError(const absl::Status& status) {
    mutex_lock lock(mu);
    if (first_error.ok()) first_error = status;
  }
  absl::Status FirstError() {
    mutex_lock lock(mu);
    return first_error;
  }
};

// Every running call gets its own CancellationManager, child of its caller's. Functional ops
// between two calls (If, While, Case, PartitionedCall) pass the cancellation manager through
// unchanged, so the manager a kernel receives identifies the call it runs inside: that is how a
// nested call learns its depth without changing the function's signature.
class CallRegistry {
 public:
  struct Entry {
    int64_t depth = 0;
    std::shared_ptr<RecursionRoot> root;
    // The runtime the call's function was instantiated in; alive until the call finishes.
    FunctionLibraryRuntime* flr = nullptr;
  };

  static CallRegistry& Global() {
    static CallRegistry* registry = new CallRegistry;
    return *registry;
  }

  // Returns false (and leaves *entry alone) when `cm` belongs to no running Invoke call.
  bool Lookup(const CancellationManager* cm, Entry* entry) {
    if (cm == nullptr) return false;
    tf_shared_lock lock(mu_);
    auto it = calls_.find(cm);
    if (it == calls_.end()) return false;
    *entry = it->second;
    return true;
  }
  void Add(const CancellationManager* cm, Entry entry) {
    mutex_lock lock(mu_);
    calls_[cm] = std::move(entry);
  }
  void Remove(const CancellationManager* cm) {
    mutex_lock lock(mu_);
    calls_.erase(cm);
  }

 private:
  mutex mu_;
  absl::flat_hash_map<const CancellationManager*, Entry> calls_ TF_GUARDED_BY(mu_);
};

}  // namespace tfweave
}  // namespace tensorflow

#endif  // TFWEAVE_TF_OPS_INVOKE_KERNELS_INVOKE_H_
