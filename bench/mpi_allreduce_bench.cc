// mpi_allreduce_bench: how fast Open MPI sums float arrays across the ranks of an mpirun job —
// the all-reduce a data-parallel normd job runs on its gradients (mpi/mpi_collective.cc), timed
// alone. dp_bench.py runs it over TCP loopback and over shared memory.
//
//   mpirun -np 2 [--mca btl self,tcp | self,vader] build/bench/normd_mpi_allreduce_bench
//          [--min-bytes 4096] [--max-bytes 67108864] [--traffic-mib 256]
//
// For each size from --min-bytes to --max-bytes (powers of two): MPI_Allreduce(MPI_IN_PLACE,
// float, MPI_SUM) on one buffer, 2 untimed calls, then kTrials trials of `iters` timed calls
// each, a barrier before each trial, iters = clamp(--traffic-mib / size / kTrials, 1, 400) (the
// same on every rank). A trial's time per call is the slowest rank's mean. Rank 0 prints one
// JSON object:
//   {"ranks": n, "sizes": [{"bytes": b, "iters": kTrials * i, "seconds": t, "algbw_GBps":
//     b / t / 1e9, "busbw_GBps": 2 (n - 1) / n * b / t / 1e9, "best_seconds": tb,
//     "best_busbw_GBps": ...}, ...], "sums_ok": true}
// t is the mean over all trials, tb the fastest trial's (on a machine shared with other work,
// the trial least disturbed). busbw is the bus bandwidth of nccl-tests: the bytes each rank's
// link carries per second in a ring all-reduce (2 (n - 1) / n of the buffer), comparable
// across rank counts and with a link's rated bandwidth. The first element of every sum is
// checked (each rank adds rank + 1).
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr int kTrials = 5;

struct Options {
  long long min_bytes = 4096;
  long long max_bytes = 64ll << 20;
  long long traffic_mib = 256;
};

bool Parse(int argc, char** argv, Options* o) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const long long v = std::atoll(argv[i + 1]);
    if (flag == "--min-bytes") o->min_bytes = v;
    else if (flag == "--max-bytes") o->max_bytes = v;
    else if (flag == "--traffic-mib") o->traffic_mib = v;
    else return false;
  }
  return argc % 2 == 1 && o->min_bytes >= 4 && o->max_bytes >= o->min_bytes &&
         o->max_bytes <= (1ll << 30) && o->traffic_mib >= 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  Options o;
  if (!Parse(argc, argv, &o)) {
    if (rank == 0) {
      std::fprintf(stderr, "usage: mpirun -np N normd_mpi_allreduce_bench [--min-bytes B] "
                           "[--max-bytes B (<= 1 GiB)] [--traffic-mib M]\n");
    }
    MPI_Finalize();
    return 2;
  }
  std::vector<float> buf(static_cast<size_t>(o.max_bytes / sizeof(float)));
  bool ok = true;
  if (rank == 0) std::printf("{\"ranks\": %d, \"sizes\": [", size);
  for (long long bytes = o.min_bytes; bytes <= o.max_bytes; bytes *= 2) {
    const int count = static_cast<int>(bytes / static_cast<long long>(sizeof(float)));
    const long long iters = std::clamp((o.traffic_mib << 20) / bytes / kTrials, 1ll, 400ll);
    for (int w = 0; w < 2; ++w) {
      MPI_Allreduce(MPI_IN_PLACE, buf.data(), count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    }
    std::fill(buf.begin(), buf.begin() + count, 0.0f);
    buf[0] = static_cast<float>(rank + 1);
    float first = 0.0f;
    double total = 0.0, best = 0.0;
    for (int t = 0; t < kTrials; ++t) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = MPI_Wtime();
      for (long long i = 0; i < iters; ++i) {
        MPI_Allreduce(MPI_IN_PLACE, buf.data(), count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        // The first call sums rank + 1 over the ranks; the later ones multiply it by `size`.
        if (t == 0 && i == 0) first = buf[0];
      }
      double mine = (MPI_Wtime() - t0) / static_cast<double>(iters), slowest = 0.0;
      MPI_Reduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
      total += slowest / kTrials;
      best = t == 0 ? slowest : std::min(best, slowest);
    }
    if (first != static_cast<float>(size * (size + 1) / 2)) ok = false;
    if (rank == 0) {
      const double bus = 2.0 * (size - 1) / size * static_cast<double>(bytes) / 1e9;
      std::printf("%s{\"bytes\": %lld, \"iters\": %lld, \"seconds\": %.9f, "
                  "\"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f, \"best_seconds\": %.9f, "
                  "\"best_busbw_GBps\": %.4f}",
                  bytes == o.min_bytes ? "" : ", ", bytes, iters * kTrials, total,
                  static_cast<double>(bytes) / total / 1e9, bus / total, best, bus / best);
    }
  }
  int all_ok = 0, mine_ok = ok ? 1 : 0;
  MPI_Allreduce(&mine_ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("], \"sums_ok\": %s}\n", all_ok ? "true" : "false");
    if (!all_ok) std::fprintf(stderr, "normd_mpi_allreduce_bench: a sum came out wrong\n");
  }
  MPI_Finalize();
  return all_ok ? 0 : 1;
}
