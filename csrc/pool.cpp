// A persistent pool of worker threads for the CPU noise kernels.
//
// Why a pool: a scratch probe adds noise to each module in turn, one call per module per probe, so
// a step makes hundreds of calls, many on tensors that take tens of microseconds; creating and
// joining a std::thread per call costs tens of microseconds more.
//
// Design: one mutex guards the pool: a FIFO of the jobs that have unclaimed tasks, the workers and a
// stop flag. A call (run) puts its job, which lives on the caller's stack and counts its own tasks,
// at the back of the FIFO, wakes one worker per task past the first and runs task 0; then it runs
// whatever tasks of its job no worker has claimed yet, and waits on the job's condition variable
// until every claimed task has finished. A worker sleeps on the pool's condition variable until the
// FIFO has a job, claims the next task of the front job (dropping the job from the FIFO with its
// last task), runs it without the lock, and counts it finished, waking the job's caller at the last.
// Calls from several threads thus run side by side, and a call completes even with no worker (a
// thread that could not be created, a pool that is stopping): its caller runs what is left.
//
// Workers are created lazily, count - 1 of them for the largest count ever asked, and live on.
// fork(): the child has only the forking thread, while the pool's mutex and condition variables may
// record threads that do not exist there. A pthread_atfork handler forgets the pool in the child
// (leaking it: tearing it down would touch that state), whose first call then builds a new one.
// Exit: a static destructor stops the workers and joins them (they finish the task they run and
// take no other). The pool stays allocated, so a thread still inside run() then (a daemon thread at
// interpreter exit) finishes its job on its own rather than touching freed memory.
#include "pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace hosl {
namespace pool {
namespace {

struct Job {
  Job(TaskFn f, const void* c, int n) : fn(f), ctx(c), count(n) {}
  const TaskFn fn;
  const void* const ctx;
  const int count;
  int next = 1;      // the next index nobody has claimed (the caller runs 0)
  int finished = 0;  // tasks 1 to count - 1 that have returned
  std::condition_variable done;
};

class Pool {
 public:
  void run(int count, TaskFn fn, const void* ctx) {
    Job job(fn, ctx, count);
    {
      std::lock_guard<std::mutex> lock(mu_);
      start_workers(count - 1);
      jobs_.push_back(&job);
    }
    for (int i = 1; i < count; ++i) wake_.notify_one();
    fn(ctx, 0);
    std::unique_lock<std::mutex> lock(mu_);
    while (job.next < job.count) {  // tasks no worker has claimed: run them here
      const int index = claim(&job);
      lock.unlock();
      fn(ctx, index);
      lock.lock();
      ++job.finished;
    }
    job.done.wait(lock, [&] { return job.finished == job.count - 1; });
  }

  void stop_and_join() {
    std::vector<std::thread> workers;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      workers.swap(workers_);
    }
    wake_.notify_all();
    for (std::thread& w : workers) w.join();
  }

 private:
  // With mu_ held.
  void start_workers(int wanted) {
    while (!stopping_ && static_cast<int>(workers_.size()) < wanted) {
      try {
        workers_.emplace_back(&Pool::work, this);
      } catch (const std::exception&) {
        return;  // no more threads to be had: the callers run the tasks nobody claims
      }
    }
  }

  // With mu_ held: the next index of job, which is in the FIFO; drops it from there with its last.
  int claim(Job* job) {
    const int index = job->next++;
    if (job->next == job->count) jobs_.erase(std::find(jobs_.begin(), jobs_.end(), job));
    return index;
  }

  void work() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      wake_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
      if (stopping_) return;
      Job* job = jobs_.front();
      const int index = claim(job);
      lock.unlock();
      job->fn(job->ctx, index);
      lock.lock();
      // Notified with mu_ held: the caller cannot return, and free the job, before mu_ is released.
      if (++job->finished == job->count - 1) job->done.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;  // workers wait here for jobs
  std::deque<Job*> jobs_;         // jobs with unclaimed tasks, oldest first
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

std::atomic<Pool*> g_pool{nullptr};

Pool* the_pool() {
  Pool* pool = g_pool.load(std::memory_order_acquire);
  if (pool != nullptr) return pool;
  Pool* fresh = new Pool;
  if (g_pool.compare_exchange_strong(pool, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread installed one first; this one never started a worker
  return pool;
}

// An atomic store is all the child may safely do here; the leaked pool's workers exist only in the parent.
void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

struct Lifetime {
  Lifetime() { pthread_atfork(nullptr, nullptr, forget_pool_in_child); }
  ~Lifetime() {
    if (Pool* pool = g_pool.load(std::memory_order_acquire)) pool->stop_and_join();
  }
} g_lifetime;

}  // namespace

void run(int count, TaskFn fn, const void* ctx) {
  if (count <= 1) {
    if (count == 1) fn(ctx, 0);
    return;
  }
  the_pool()->run(count, fn, ctx);
}

}  // namespace pool
}  // namespace hosl
