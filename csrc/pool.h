// A persistent pool of worker threads for the CPU noise kernels (pool.cpp says why and how).
#pragma once

namespace hosl {
namespace pool {

// One task of a job: runs part `index` of the job described by ctx. Must not throw.
using TaskFn = void (*)(const void* ctx, int index) noexcept;

// Runs fn(ctx, 0), ..., fn(ctx, count - 1) and returns once every one of them has returned: index 0
// on the calling thread, the others on the pool's workers or, where no worker has taken them yet
// when the caller is done with its own, on the calling thread too. Which thread runs an index never
// matters to a caller whose tasks write disjoint memory. Safe to call from several threads at once
// and in a child process after fork(); takes no Python lock (call it with the GIL released).
void run(int count, TaskFn fn, const void* ctx);

// run() on a callable f(int index): f must not throw, and it runs on several threads at once.
template <typename F>
void parallel_for(int count, const F& f) {
  run(count, [](const void* ctx, int index) noexcept { (*static_cast<const F*>(ctx))(index); }, &f);
}

}  // namespace pool
}  // namespace hosl
