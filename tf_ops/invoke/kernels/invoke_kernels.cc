// Kernels of Invoke, InvokeByKey (one AsyncOpKernel) and the residual pack/unpack pair.
//
// A call instantiates its function once per FunctionLibraryRuntime (cached in the kernel) with
// the default executor, and runs it with FunctionLibraryRuntime::Run, whose done callback
// finishes the op: no inter-op thread waits while the callee runs, so the two recursive calls of
// a tree node run in parallel and a deep recursion holds no thread stack per level.

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tensorflow/core/framework/attr_value.pb.h"
#include "tensorflow/core/framework/function.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/framework/variant.h"
#include "tensorflow/core/framework/variant_encode_decode.h"
#include "tensorflow/core/framework/variant_op_registry.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/mutex.h"
#include "tf_ops/invoke/kernels/invoke.h"

namespace tensorflow {
namespace tfweave {
namespace {

using FHandle = FunctionLibraryRuntime::Handle;

// The FunctionDef attr that names a function's original name; SavedModel loading renames the
// function but copies its attrs, so InvokeByKey still finds it.
constexpr char kOriginalNameAttr[] = "_original_func_name";

std::string TypeList(const DataTypeVector& types) {
  return absl::StrJoin(types, ", ", [](std::string* out, DataType t) {
    absl::StrAppend(out, DataTypeString(t));
  });
}

class InvokeOp : public AsyncOpKernel {
 public:
  explicit InvokeOp(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {
    by_key_ = ctx->HasAttr("function_key");
    if (by_key_) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("function_key", &function_key_));
      OP_REQUIRES(ctx, !function_key_.empty(),
                  errors::InvalidArgument("InvokeByKey needs a non-empty function_key"));
    } else {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("f", &func_));
      function_key_ = func_.name();
    }
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tin", &input_types_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tout", &output_types_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_depth", &max_depth_));
    OP_REQUIRES(ctx, max_depth_ > 0,
                errors::InvalidArgument("Invoke of '", function_key_,
                                        "': max_depth must be positive, got ", max_depth_));
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    FunctionLibraryRuntime* flr = ctx->function_library();
    OP_REQUIRES_ASYNC(ctx, flr != nullptr,
                      errors::Internal("Invoke of '", function_key_,
                                       "' has no function library to call it from"),
                      done);
    // Depth and root of this call, from the call (if any) this kernel runs inside.
    CallRegistry::Entry caller;
    const bool nested = CallRegistry::Global().Lookup(ctx->cancellation_manager(), &caller);
    const int64_t depth = nested ? caller.depth + 1 : 1;
    if (nested) {
      absl::Status earlier = caller.root->FirstError();
      if (!earlier.ok()) {  // another branch of this recursion failed: stop here
        ctx->SetStatus(earlier);
        done();
        return;
      }
    }
    // A functional op between two calls (If, While) runs its branch with a library reduced to
    // what the branch reaches, which no longer holds the function a self-call names by key; the
    // enclosing call's runtime does, so the call falls back to it.
    FHandle handle;
    std::string function_name;
    absl::Status found = GetHandle(flr, &handle, &function_name);
    if (errors::IsNotFound(found) && nested && caller.flr != nullptr && caller.flr != flr) {
      flr = caller.flr;
      found = GetHandle(flr, &handle, &function_name);
    }
    OP_REQUIRES_OK_ASYNC(ctx, found, done);
    if (depth > max_depth_) {
      absl::Status status = errors::ResourceExhausted(
          "Invoke: the recursion of function '", function_key_, "' is ", depth,
          " calls deep, more than its max_depth of ", max_depth_,
          ". Check that its base case is reached for every input (a cyclic tree never reaches "
          "it), or raise max_depth (recursion.function(max_depth=...)).");
      caller.root->RecordError(status);
      caller.root->cancellation->StartCancel();
      ctx->SetStatus(status);
      done();
      return;
    }

    auto* call = new Call;
    call->ctx = ctx;
    call->done = std::move(done);
    CancellationManager* parent_cm = ctx->cancellation_manager();
    call->cancellation = parent_cm ? std::make_unique<CancellationManager>(parent_cm)
                                   : std::make_unique<CancellationManager>();
    if (nested) {
      call->root = caller.root;
    } else {
      call->root = std::make_shared<RecursionRoot>();
      call->root->cancellation = call->cancellation.get();
    }
    CallRegistry::Global().Add(call->cancellation.get(), {depth, call->root, flr});

    FunctionLibraryRuntime::Options opts;
    opts.rendezvous = ctx->rendezvous();
    opts.cancellation_manager = call->cancellation.get();
    opts.step_container = ctx->step_container();
    opts.collective_executor = ctx->collective_executor();
    opts.stats_collector = ctx->stats_collector();
    opts.coordination_service_agent = ctx->coordination_service_agent();
    // The library's own runner is the inter-op pool; the caller's may run closures inline (eager
    // ops do), which would serialise the recursion and grow the stack with its depth.
    opts.runner = flr->runner() != nullptr ? flr->runner() : ctx->runner();
    opts.run_all_kernels_inline = false;

    call->args.reserve(ctx->num_inputs());
    for (int i = 0; i < ctx->num_inputs(); ++i) call->args.push_back(ctx->input(i));

    flr->Run(opts, handle, call->args, &call->rets,
             [this, call, function_name](const absl::Status& run_status) {
               Finish(call, run_status, function_name);
             });
  }

 private:
  struct Call {
    OpKernelContext* ctx = nullptr;
    DoneCallback done;
    std::unique_ptr<CancellationManager> cancellation;
    std::shared_ptr<RecursionRoot> root;
    std::vector<Tensor> args;
    std::vector<Tensor> rets;
  };

  void Finish(Call* call, absl::Status status, const std::string& function_name) {
    CallRegistry::Global().Remove(call->cancellation.get());
    if (!status.ok()) {
      if (!errors::IsCancelled(status)) {
        call->root->RecordError(status);
        // Stop the rest of this recursion: a runaway recursion that branches would otherwise
        // keep starting calls up to max_depth on every branch.
        call->root->cancellation->StartCancel();
      }
      absl::Status first = call->root->FirstError();
      if (!first.ok()) status = first;
    } else if (call->rets.size() != output_types_.size()) {
      status = errors::Internal("Invoke of '", function_name, "' returned ", call->rets.size(),
                                " values, expected ", output_types_.size());
    }
    if (status.ok()) {
      for (int i = 0; i < static_cast<int>(call->rets.size()); ++i) {
        call->ctx->set_output(i, call->rets[i]);
      }
    } else {
      call->ctx->SetStatus(status);
    }
    DoneCallback done = std::move(call->done);
    delete call;
    done();
  }

  // The name of the library function this kernel calls, found in `lib_def`.
  absl::Status ResolveName(const FunctionLibraryDefinition* lib_def, std::string* name) const {
    if (lib_def->Contains(function_key_)) {
      *name = function_key_;
      return absl::OkStatus();
    }
    if (by_key_) {
      for (const std::string& candidate : lib_def->ListFunctionNames()) {
        const FunctionDef* fdef = lib_def->Find(candidate);
        if (fdef == nullptr) continue;
        auto it = fdef->attr().find(kOriginalNameAttr);
        if (it != fdef->attr().end() && it->second.s() == function_key_) {
          *name = candidate;
          return absl::OkStatus();
        }
      }
    }
    return errors::NotFound(
        "Invoke: no function '", function_key_,
        "' in the function library. Define it with tfweave.recursion.function (which adds it "
        "to the library of the graph or eager context that calls it), and load the tfweave "
        "'invoke' op library before loading a SavedModel that uses it.");
  }

  // Checks that the callee's signature matches this call's Tin/Tout.
  absl::Status CheckSignature(const FunctionDef& fdef, const std::string& name) const {
    const OpDef& sig = fdef.signature();
    DataTypeVector takes, gives;
    for (const auto& arg : sig.input_arg()) {
      if (arg.type() == DT_INVALID) return absl::OkStatus();  // polymorphic: checked by Run
      takes.push_back(arg.type());
    }
    for (const auto& arg : sig.output_arg()) {
      if (arg.type() == DT_INVALID) return absl::OkStatus();
      gives.push_back(arg.type());
    }
    if (takes != input_types_) {
      return errors::InvalidArgument(
          "Invoke of '", name, "': the function takes ", takes.size(), " arguments (",
          TypeList(takes), ") but the call passes ", input_types_.size(), " (",
          TypeList(input_types_), ")");
    }
    if (gives != output_types_) {
      return errors::InvalidArgument(
          "Invoke of '", name, "': the function returns ", gives.size(), " values (",
          TypeList(gives), ") but the call expects ", output_types_.size(), " (",
          TypeList(output_types_), ")");
    }
    return absl::OkStatus();
  }

  // A kernel may be shared by graphs run through different FunctionLibraryRuntimes, whose
  // handles are distinct namespaces, so handles are cached per runtime (as TF's IfOp does).
  absl::Status GetHandle(FunctionLibraryRuntime* flr, FHandle* handle,
                         std::string* name) {
    {
      tf_shared_lock lock(mu_);
      auto it = handles_.find(flr);
      if (it != handles_.end()) {
        *handle = it->second.first;
        *name = it->second.second;
        return absl::OkStatus();
      }
    }
    const FunctionLibraryDefinition* lib_def = flr->GetFunctionLibraryDefinition();
    if (lib_def == nullptr) {
      return errors::Internal("Invoke of '", function_key_, "': no function library");
    }
    std::string resolved;
    TF_RETURN_IF_ERROR(ResolveName(lib_def, &resolved));
    const FunctionDef* fdef = lib_def->Find(resolved);
    if (fdef == nullptr) {
      return errors::NotFound("Invoke: function '", resolved, "' vanished from the library");
    }
    TF_RETURN_IF_ERROR(CheckSignature(*fdef, resolved));

    FunctionLibraryRuntime::InstantiateOptions options;
    // The default executor: the eager context's single-threaded executor would run a nested call
    // on the thread that waits for it, and deadlock.
    options.executor_type = "";
    options.is_multi_device_function = false;
    // target stays empty: the function is instantiated on this runtime's own device.
    FHandle instantiated;
    AttrSlice attrs = by_key_ ? AttrSlice() : AttrSlice(&func_.attr());
    absl::Status status = flr->Instantiate(resolved, attrs, options, &instantiated);
    if (!status.ok()) {
      return errors::CreateWithUpdatedMessage(
          status, absl::StrCat("Invoke: instantiating function '", resolved,
                               "' failed: ", status.message()));
    }
    mutex_lock lock(mu_);
    auto inserted = handles_.emplace(flr, std::make_pair(instantiated, resolved));
    *handle = inserted.first->second.first;
    *name = resolved;
    return absl::OkStatus();
  }

  bool by_key_ = false;
  NameAttrList func_;
  std::string function_key_;
  DataTypeVector input_types_;
  DataTypeVector output_types_;
  int64_t max_depth_ = 10000;

  mutex mu_;
  absl::flat_hash_map<FunctionLibraryRuntime*, std::pair<FHandle, std::string>> handles_
      TF_GUARDED_BY(mu_);
};

class InvokePackResidualsOp : public OpKernel {
 public:
  explicit InvokePackResidualsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    ResidualList list;
    list.values.reserve(ctx->num_inputs());
    for (int i = 0; i < ctx->num_inputs(); ++i) list.values.push_back(ctx->input(i));
    Tensor* out = nullptr;
    AllocatorAttributes host;
    host.set_on_host(true);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out, host));
    out->scalar<Variant>()() = std::move(list);
  }
};

class InvokeUnpackResidualsOp : public OpKernel {
 public:
  explicit InvokeUnpackResidualsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &types_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& handle = ctx->input(0);
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(handle.shape()),
                errors::InvalidArgument("InvokeUnpackResiduals expects a scalar variant, got "
                                        "shape ",
                                        handle.shape().DebugString()));
    const ResidualList* list = handle.scalar<Variant>()().get<ResidualList>();
    OP_REQUIRES(ctx, list != nullptr,
                errors::InvalidArgument("InvokeUnpackResiduals expects the output of "
                                        "InvokePackResiduals, got ",
                                        handle.scalar<Variant>()().DebugString()));
    OP_REQUIRES(ctx, list->values.size() == types_.size(),
                errors::InvalidArgument("InvokeUnpackResiduals: ", list->values.size(),
                                        " residuals were packed but ", types_.size(),
                                        " are expected"));
    for (int i = 0; i < static_cast<int>(types_.size()); ++i) {
      OP_REQUIRES(ctx, list->values[i].dtype() == types_[i],
                  errors::InvalidArgument("InvokeUnpackResiduals: residual ", i, " is ",
                                          DataTypeString(list->values[i].dtype()),
                                          ", expected ", DataTypeString(types_[i])));
      ctx->set_output(i, list->values[i]);
    }
  }

 private:
  DataTypeVector types_;
};

// The gradient machinery may ask for zeros of a residual output (it never carries a gradient).
absl::Status ResidualListZerosLike(OpKernelContext*, const ResidualList&, ResidualList* out) {
  out->values.clear();
  return absl::OkStatus();
}

}  // namespace

constexpr const char ResidualList::kTypeName[];

REGISTER_UNARY_VARIANT_DECODE_FUNCTION(ResidualList, ResidualList::kTypeName);
REGISTER_UNARY_VARIANT_UNARY_OP_FUNCTION(ZEROS_LIKE_VARIANT_UNARY_OP, DEVICE_CPU, ResidualList,
                                         ResidualListZerosLike);

REGISTER_KERNEL_BUILDER(Name("Invoke").Device(DEVICE_CPU), InvokeOp);
REGISTER_KERNEL_BUILDER(Name("InvokeByKey").Device(DEVICE_CPU), InvokeOp);
REGISTER_KERNEL_BUILDER(Name("InvokePackResiduals").Device(DEVICE_CPU), InvokePackResidualsOp);
REGISTER_KERNEL_BUILDER(Name("InvokeUnpackResiduals").Device(DEVICE_CPU),
                        InvokeUnpackResidualsOp);

#if GOOGLE_CUDA || TENSORFLOW_USE_ROCM
// The call moves no data: arguments and results stay where the callee's _Arg/_Retval nodes put
// them, so the GPU registration is the same kernel. The residual list lives on the host.
REGISTER_KERNEL_BUILDER(Name("Invoke").Device(DEVICE_GPU), InvokeOp);
REGISTER_KERNEL_BUILDER(Name("InvokeByKey").Device(DEVICE_GPU), InvokeOp);
REGISTER_KERNEL_BUILDER(Name("InvokePackResiduals").Device(DEVICE_GPU).HostMemory("residuals"),
                        InvokePackResidualsOp);
REGISTER_KERNEL_BUILDER(Name("InvokeUnpackResiduals").Device(DEVICE_GPU).HostMemory("residuals"),
                        InvokeUnpackResidualsOp);
#endif  // GOOGLE_CUDA || TENSORFLOW_USE_ROCM

}  // namespace tfweave
}  // namespace tensorflow
