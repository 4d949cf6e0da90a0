// Runs tsbn ops from C++ through the dispatcher, as a model served without Python would.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("tsbn::task_counts", "")
                .typed<at::Tensor(const at::Tensor&, int64_t)>();
  const at::Tensor ids = torch::tensor({0, 2, 2, -1, 1, 7, 2}, torch::kLong);
  const at::Tensor counts = op.call(ids, 3);
  const at::Tensor want = torch::tensor({1, 1, 1, 3, 1}, torch::kLong);
  expect(torch::equal(counts, want), "task_counts counts each task and the out-of-range ids");

  const at::Tensor big = torch::randint(0, 4, {200000}, torch::kLong);
  const at::Tensor big_counts = op.call(big, 4);
  expect(big_counts.sum().item<int64_t>() == 200000, "task_counts over several chunks sums to n");
  expect(torch::equal(big_counts.slice(0, 1, 5), torch::bincount(big, {}, 4)), "task_counts matches bincount");

  bool raised = false;
  try {
    op.call(torch::zeros({2, 2}, torch::kLong), 3);
  } catch (const c10::ValueError&) {
    raised = true;
  }
  expect(raised, "a 2-D task_ids raises c10::ValueError");

  auto built = c10::Dispatcher::singleton().findSchemaOrThrow("tsbn::built_with_cuda", "").typed<bool()>();
  std::cout << "built_with_cuda=" << built.call() << "\n";

  if (failures == 0) std::cout << "all tsbn C++ op tests passed\n";
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
