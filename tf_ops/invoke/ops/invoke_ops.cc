// Invoke: call a function from the graph library, asynchronously, so a function may call itself.
//
// Three call ops share one kernel (kernels/invoke_kernels.cc):
//   Invoke       (args: Tin) -> output: Tout    attr f: func            (a call from outside f)
//   InvokeByKey  (args: Tin) -> output: Tout    attr function_key: str  (a call from inside f)
// and two ops carry a recursion's forward values to its backward pass:
//   InvokePackResiduals   (values: T)               -> residuals: variant
//   InvokeUnpackResiduals (residuals: variant)      -> values: T
//
// Why two call ops: a FunctionDef whose body names itself in a `func` attr is a dependency cycle,
// and tf.saved_model.load refuses cycles ("cyclic dependency between functions"). So a recursive
// function refers to itself through `function_key`, a plain string resolved at run time against
// the FunctionDef attr `_original_func_name` (kept when a SavedModel loader renames functions),
// while calls from outside use `f`, which keeps the function reachable for graph pruning and is
// renamed consistently by the loader.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Outputs take `output_shapes` where given (the recursion's declared output signature); any
// output beyond them (a residual handle added for the gradient) is unknown.
absl::Status InvokeShape(InferenceContext* c) {
  std::vector<PartialTensorShape> output_shapes;
  TF_RETURN_IF_ERROR(c->GetAttr("output_shapes", &output_shapes));
  for (int i = 0; i < c->num_outputs(); ++i) {
    if (i < static_cast<int>(output_shapes.size())) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->MakeShapeFromPartialTensorShape(output_shapes[i], &shape));
      c->set_output(i, shape);
    } else {
      c->set_output(i, c->UnknownShape());
    }
  }
  return absl::OkStatus();
}

constexpr char kCallDoc[] = R"doc(
args: the function's arguments, in the order of its signature.
output: the function's results.
Tin: the argument types; they must equal the function's input types.
Tout: the result types; they must equal the function's output types.
output_shapes: static shapes of the first outputs, for shape inference only.
max_depth: the deepest nesting of calls allowed before the call fails with ResourceExhausted
  naming the function; each level holds one running function frame.
)doc";

}  // namespace

REGISTER_OP("Invoke")
    .Input("args: Tin")
    .Output("output: Tout")
    .Attr("Tin: list(type) >= 0")
    .Attr("Tout: list(type) >= 0")
    .Attr("f: func")
    .Attr("output_shapes: list(shape) = []")
    .Attr("max_depth: int = 10000")
    // Stateful: never constant-folded or pruned by the optimizers, since the callee may be
    // stateful and is opaque to them (as StatefulPartitionedCall).
    .SetIsStateful()
    .SetShapeFn(InvokeShape)
    .Doc(std::string(R"doc(
Calls function `f` asynchronously on the kernel's device; `f` may itself contain calls to `f`
(through InvokeByKey), and independent calls run in parallel on the inter-op thread pool.
f: the function to call.
)doc") + kCallDoc);

REGISTER_OP("InvokeByKey")
    .Input("args: Tin")
    .Output("output: Tout")
    .Attr("Tin: list(type) >= 0")
    .Attr("Tout: list(type) >= 0")
    .Attr("function_key: string")
    .Attr("output_shapes: list(shape) = []")
    .Attr("max_depth: int = 10000")
    .SetIsStateful()
    .SetShapeFn(InvokeShape)
    .Doc(std::string(R"doc(
Calls the library function whose name, or whose `_original_func_name` attr, is `function_key`:
the self-reference of a recursive function (see Invoke).
function_key: the function's original name.
)doc") + kCallDoc);

REGISTER_OP("InvokePackResiduals")
    .Input("values: T")
    .Output("residuals: variant")
    .Attr("T: list(type) >= 0")
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc(R"doc(
Packs tensors (a recursion level's forward values, kept for its backward pass) into one scalar
variant without copying them, so a recursive call can return a fixed number of outputs however
deep its own callees went.
)doc");

REGISTER_OP("InvokeUnpackResiduals")
    .Input("residuals: variant")
    .Output("values: T")
    .Attr("T: list(type) >= 0")
    .SetShapeFn(shape_inference::UnknownShape)
    .Doc(R"doc(
Returns the tensors InvokePackResiduals packed; T must equal the packed types.
)doc");

}  // namespace tensorflow
