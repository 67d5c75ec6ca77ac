// The schema of every wsss_fast op. Implementations register per device in cpu/ and cuda/;
// autograd and fake (meta) kernels are attached in Python (wsss_fast/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import wsss_fast._C` loads this library, which runs the registrations below; the module
// itself is empty because every op is reached through torch.ops.wsss_fast.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // docstring
      -1,    // per-interpreter state size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(wsss_fast, m) {
  m.def("random_walk_forward(Tensor aff, Tensor cam, float beta, int steps) -> Tensor");
  m.def("random_walk_backward(Tensor aff, Tensor grad_out, float beta, int steps) -> Tensor");
  // q, k, v, grad_out: [L, B, H, N, D]; returns the [B, N] float32 map summed over L.
  m.def(
      "getam_map_forward(Tensor q, Tensor k, Tensor v, Tensor grad_out, float scale, int row) -> "
      "Tensor");
  m.def(
      "getam_map_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor grad_out, float scale, "
      "int row) -> (Tensor, Tensor, Tensor, Tensor)");
  // image: [B, 3, H, W]; masks: [B, C, H, W] (already at the image size); no gradient.
  m.def(
      "par_forward(Tensor image, Tensor masks, int[] dilations, int iters, float w_pos) -> Tensor");
  m.def("pamr_forward(Tensor image, Tensor masks, int[] dilations, int iters) -> Tensor");
}
