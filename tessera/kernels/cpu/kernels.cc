// tessera's CPU kernels for decode steps, called through the XLA FFI
// (tessera/kernels/cpu/__init__.py builds this file at first use with the host's C++ compiler
// and -march=native, cached per source, jax version, compiler and CPU).
//
// XLA:CPU runs a decode step's few-row products and its attention over the cache on one core.
// Both kernels here cut their work into chunks that the calling thread and one helper thread
// share, so a step's reads use both cores' memory pipes.
//
// tessera_cpu_dense: y_p[M, N_p] = x[M, K] @ w_p[K, N_p] for up to 8 weights w_p sharing one
// input (attention's q, k, v; the MLP's gate and up), float32, row-major, few rows (M is the
// decode batch).
// - M = 1 (`one_row`): chunks of 128 columns. A chunk's partial sums stay in L1 while its weight
//   rows stream past 4 at a time, software-prefetched 8 rows ahead.
// - M >= 2 (`row_block`): chunks are up to 4 slices of w's rows, read in blocks of ~256 KiB of
//   whole rows (contiguous memory). Register tiles of 8 (4, 2, 1) rows of x by 32 columns add a
//   block into the slice's own partial sums; while a block computes, the thread prefetches the
//   next one (or its next chunk's first) into L2. The caller adds the slices' sums into y in
//   slice order at the end, so results never depend on which thread ran what. Without AVX-512
//   a portable loop runs instead of the tiles.
//
// tessera_cpu_decode_attention: one query token per row over a [B, S, Hkv, D] cache, chunks of
// (batch row, kv head) items (`Attention`).
//
// Chunks are claimed from a shared counter, the caller from the front and the helper from the
// back, so each knows its next chunk. The caller never waits for the helper to start: it takes
// every chunk the helper has not, and waits only for chunks the helper is running. The helper
// spins for a while after each job (decode calls come back to back), then parks on a futex. A
// second caller while the helper is taken (XLA running two custom calls at once) runs alone.

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace {

constexpr long kColChunk = 128;          // M = 1: columns per chunk
constexpr long kRowChunkBytes = 256 << 10;  // M >= 2: bytes of w per chunk
constexpr int kMaxParts = 8;

long EnvLong(const char* name, long fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atol(v) : fallback;
}

// ---- M = 1: columns [n0, n1) of y = x @ w ------------------------------------------------------

void one_row(const float* __restrict x, const float* __restrict w, float* __restrict y, long K,
             long N, long n0, long n1) {
  alignas(64) float acc[kColChunk];
  for (long nb = n0; nb < n1; nb += kColChunk) {
    const long nn = (n1 - nb < kColChunk) ? n1 - nb : kColChunk;
    std::memset(acc, 0, sizeof(acc));
    long k = 0;
    for (; k + 4 <= K; k += 4) {
      const float* w0 = w + k * N + nb;
      const float* w1 = w0 + N;
      const float* w2 = w1 + N;
      const float* w3 = w2 + N;
      if (k + 12 <= K) {
        for (long j = 0; j < nn; j += 16) {
          __builtin_prefetch(w0 + 8 * N + j);
          __builtin_prefetch(w1 + 8 * N + j);
          __builtin_prefetch(w2 + 8 * N + j);
          __builtin_prefetch(w3 + 8 * N + j);
        }
      }
      const float x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
#pragma GCC ivdep
      for (long j = 0; j < nn; ++j) acc[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
    }
    for (; k < K; ++k) {
      const float* wr = w + k * N + nb;
      const float xv = x[k];
      for (long j = 0; j < nn; ++j) acc[j] += xv * wr[j];
    }
    std::memcpy(y + nb, acc, sizeof(float) * nn);
  }
}

// ---- M >= 2: rows [k0, k1) of w against all its columns, added into acc [M, N] -----------------

// Lines of memory to prefetch into L2, a few per inner-loop step.
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  long per_step = 0;
  inline void Step() {
    for (long i = 0; i < per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

#ifdef __AVX512F__
// acc[r, 16c + j] += sum_k x[r, k] w[k, 16c + j] for R rows, C vectors (the last one masked).
template <int R, int C>
inline void tile(const float* __restrict x, long ldx, const float* __restrict w, long ldw,
                 float* __restrict acc, long ldacc, long kc, __mmask16 last, Prefetch& pf) {
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      a[r][c] = (c == C - 1) ? _mm512_maskz_loadu_ps(last, acc + r * ldacc + 16 * c)
                             : _mm512_loadu_ps(acc + r * ldacc + 16 * c);
  for (long k = 0; k < kc; ++k) {
    pf.Step();
    const float* wr = w + k * ldw;
    __m512 wv[C];
    for (int c = 0; c < C; ++c)
      wv[c] = (c == C - 1) ? _mm512_maskz_loadu_ps(last, wr + 16 * c) : _mm512_loadu_ps(wr + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      if (c == C - 1) {
        _mm512_mask_storeu_ps(acc + r * ldacc + 16 * c, last, a[r][c]);
      } else {
        _mm512_storeu_ps(acc + r * ldacc + 16 * c, a[r][c]);
      }
    }
}

template <int C>
void rows_of_x(const float* x, long M, long K, const float* w, long N, float* acc, long kc,
               __mmask16 last, Prefetch& pf) {
  long m = 0;
  for (; M - m >= 8; m += 8) tile<8, C>(x + m * K, K, w, N, acc + m * N, N, kc, last, pf);
  if (M - m >= 4) { tile<4, C>(x + m * K, K, w, N, acc + m * N, N, kc, last, pf); m += 4; }
  if (M - m >= 2) { tile<2, C>(x + m * K, K, w, N, acc + m * N, N, kc, last, pf); m += 2; }
  if (M - m >= 1) tile<1, C>(x + m * K, K, w, N, acc + m * N, N, kc, last, pf);
}

void row_block(const float* x, long M, long K, const float* w, long N, float* acc, long k0,
               long k1, Prefetch& pf) {
  for (long n = 0; n < N; n += 32) {
    const long pn = N - n < 32 ? N - n : 32;
    const long rem = pn > 16 ? pn - 16 : pn;
    const __mmask16 last = rem >= 16 ? 0xffff : static_cast<__mmask16>((1u << rem) - 1);
    if (pn > 16) {
      rows_of_x<2>(x + k0, M, K, w + k0 * N + n, N, acc + n, k1 - k0, last, pf);
    } else {
      rows_of_x<1>(x + k0, M, K, w + k0 * N + n, N, acc + n, k1 - k0, last, pf);
    }
  }
}
#else
void row_block(const float* x, long M, long K, const float* w, long N, float* acc, long k0,
               long k1, Prefetch& pf) {
  for (long m = 0; m < M; ++m)
    for (long k = k0; k < k1; ++k) {
      pf.Step();
      const float xv = x[m * K + k];
      const float* wr = w + k * N;
      float* a = acc + m * N;
      for (long j = 0; j < N; ++j) a[j] += xv * wr[j];
    }
}
#endif


// ---- decode attention: one query token per row over a [B, S, Hkv, D] cache ----------------------

// The work of one (batch row, kv head): its G query heads attend over the S cache slots that
// `mask` [B, S] (1 / 0) lets them see; softmax in float32 as tessera's reference
// (`kernels/attention/reference.decode_attention`), fully masked rows give zeros.
struct Attention {
  const float* q;     // [B, Hkv * G, D]
  const float* k;     // [B, S, Hkv, D]
  const float* v;     // [B, S, Hkv, Dv]
  const float* mask;  // [B, S]
  float* out;         // [B, Hkv * G, Dv]
  long B, S, Hkv, G, D, Dv;
  float scale;

  void RunItem(long item, std::vector<float>& scores) const;
};

#ifdef __AVX512F__
// exp(x) for x <= 0 (scores minus their max): 2^n * p(r), |r| <= ln2 / 2, degree-6 polynomial.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

void Attention::RunItem(long item, std::vector<float>& scores) const {
  const long b = item / Hkv, h = item % Hkv;
  const float* qb = q + (b * Hkv + h) * G * D;
  const float* kb = k + b * S * Hkv * D + h * D;
  const float* vb = v + b * S * Hkv * Dv + h * Dv;
  const float* mb = mask + b * S;
  float* ob = out + (b * Hkv + h) * G * Dv;
  const long Sp = (S + 15) / 16 * 16;  // each query head's scores, padded to whole vectors
  if (static_cast<long>(scores.size()) < G * Sp) scores.resize(G * Sp);
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (long s = 0; s < S; ++s) {
    if (mb[s] == 0.0f) {
      for (long g = 0; g < G; ++g) scores[g * Sp + s] = kMasked;
      continue;
    }
    any = true;
    const float* kr = kb + s * Hkv * D;
    for (long g = 0; g < G; ++g) {
      const float* qr = qb + g * D;
      float dot = 0.0f;
      long d = 0;
#ifdef __AVX512F__
      __m512 acc = _mm512_setzero_ps();
      for (; d + 16 <= D; d += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + d), _mm512_loadu_ps(kr + d), acc);
      dot = _mm512_reduce_add_ps(acc);
#endif
      for (; d < D; ++d) dot += qr[d] * kr[d];
      scores[g * Sp + s] = dot * scale;
    }
  }
  for (long g = 0; g < G; ++g) {
    float* og = ob + g * Dv;
    std::memset(og, 0, sizeof(float) * Dv);
    if (!any) continue;
    float* sg = scores.data() + g * Sp;
    for (long s = S; s < Sp; ++s) sg[s] = kMasked;
    float m = kMasked;
    for (long s = 0; s < S; ++s) m = std::max(m, sg[s]);
    float denom = 0.0f;
    long s = 0;
#ifdef __AVX512F__
    __m512 dv = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (; s < Sp; s += 16) {
      const __m512 x = _mm512_loadu_ps(sg + s);
      const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMasked), _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, Exp(_mm512_sub_ps(x, mv)));
      _mm512_storeu_ps(sg + s, e);
      dv = _mm512_add_ps(dv, e);
    }
    denom = _mm512_reduce_add_ps(dv);
#endif
    for (; s < S; ++s) {
      sg[s] = sg[s] == kMasked ? 0.0f : std::exp(sg[s] - m);
      denom += sg[s];
    }
    for (long t = 0; t < S; ++t) {
      const float p = sg[t];
      if (p == 0.0f) continue;
      const float* vr = vb + t * Hkv * Dv;
#pragma GCC ivdep
      for (long j = 0; j < Dv; ++j) og[j] += p * vr[j];
    }
    const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
    for (long j = 0; j < Dv; ++j) og[j] *= inv;
  }
}

// ---- jobs ---------------------------------------------------------------------------------------

constexpr long kSlices = 4;  // M >= 2: chunks per product (each with its own partial sums)

// Register-tile calls per row block (`rows_of_x`): what the next block's prefetch is spread over.
long TileCalls(long M) { return M / 8 + (M % 8) / 4 + (M % 4) / 2 + M % 2; }

// One product of a call. M = 1: chunks of `cols` columns, written into y. M >= 2: chunks are up
// to kSlices slices of w's rows, each read in blocks of `rows` rows (~256 KiB) and summed into
// its own output: slice 0 into y, slice j > 0 into `sums` + (j - 1) M N; `Reduce` adds them into
// y in slice order, so the result never depends on which thread ran which slice.
struct Part {
  const float* w;
  float* y;
  float* sums;
  long N, cols, rows, slice_rows, first, count;
};

struct Job {
  const float* x;
  long M, K, nparts, nchunks;
  Part parts[kMaxParts];
  const Attention* attention;  // set: the chunks are (batch row, kv head) items of it
  long items_per_chunk;

  const Part& PartOf(long i) const {
    int q = 0;
    while (q + 1 < nparts && parts[q + 1].first <= i) ++q;
    return parts[q];
  }

  // Chunk i; `next` is the chunk this thread takes after it (for M >= 2 the rows of its first
  // block are prefetched while this chunk's last block computes).
  void RunChunk(long i, long next) const {
    if (attention != nullptr) {
      static thread_local std::vector<float> scores;
      const long items = attention->B * attention->Hkv;
      for (long t = i * items_per_chunk; t < std::min((i + 1) * items_per_chunk, items); ++t)
        attention->RunItem(t, scores);
      return;
    }
    const Part& part = PartOf(i);
    const long c = i - part.first;
    if (M == 1) {
      const long n0 = c * part.cols;
      one_row(x, part.w, part.y, K, part.N, n0, std::min(n0 + part.cols, part.N));
      return;
    }
    float* acc = c == 0 ? part.y : part.sums + (c - 1) * M * part.N;
    std::memset(acc, 0, sizeof(float) * M * part.N);
    const long r0 = c * part.slice_rows, r1 = std::min(r0 + part.slice_rows, K);
    for (long b0 = r0; b0 < r1; b0 += part.rows) {
      const long b1 = std::min(b0 + part.rows, r1);
      Prefetch pf;
      const float* nw = nullptr;
      long n0 = 0, n1 = 0, nN = 0;
      if (b1 < r1) {
        nw = part.w, nN = part.N, n0 = b1, n1 = std::min(b1 + part.rows, r1);
      } else if (next >= 0 && next < nchunks) {
        const Part& np = PartOf(next);
        nw = np.w, nN = np.N, n0 = (next - np.first) * np.slice_rows;
        n1 = std::min(n0 + np.rows, K);
      }
      if (nw != nullptr) {
        pf.next = reinterpret_cast<const char*>(nw + n0 * nN);
        pf.end = reinterpret_cast<const char*>(nw + n1 * nN);
        const long steps = (b1 - b0) * ((part.N + 31) / 32) * TileCalls(M);
        pf.per_step = ((pf.end - pf.next) / 64 + steps - 1) / steps;
      }
      row_block(x, M, K, part.w, part.N, acc, b0, b1, pf);
    }
  }

  // M >= 2: y_p += the sums of slices 1.., in order.
  void Reduce() const {
    if (M == 1 || attention != nullptr) return;
    for (int p = 0; p < nparts; ++p) {
      const Part& part = parts[p];
      const long n = M * part.N;
      for (long c = 1; c < part.count; ++c) {
        const float* h = part.sums + (c - 1) * n;
        for (long j = 0; j < n; ++j) part.y[j] += h[j];
      }
    }
  }
};

class Helper {
 public:
  Helper() { std::thread([this] { Loop(); }).detach(); }

  void Run(const Job& job) {
    if (job.nchunks < 2 || busy_.test_and_set(std::memory_order_acquire)) {
      for (long i = 0; i < job.nchunks; ++i) job.RunChunk(i, i + 1);
      job.Reduce();
      return;
    }
    job_ = job;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    ticket_.store(gen << 32 | static_cast<uint64_t>(job.nchunks), std::memory_order_seq_cst);
    wake_.fetch_add(1, std::memory_order_seq_cst);
    if (parked_.load(std::memory_order_seq_cst)) {
      syscall(SYS_futex, &wake_, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    }
    Work(gen, job_, /*back=*/false);
    while (done_.load(std::memory_order_acquire) < job.nchunks) _mm_pause();
    busy_.clear(std::memory_order_release);
    job.Reduce();
  }

 private:
  // Takes the next chunk of job `gen` from the front (caller) or the back (helper); false once
  // none is left (or the job is over). ticket_ = gen << 32 | front << 16 | back.
  bool Claim(uint64_t gen, bool back, long* index) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while (true) {
      const long front = static_cast<long>((t >> 16) & 0xffff), end = static_cast<long>(t & 0xffff);
      if ((t >> 32) != gen || front >= end) return false;
      const uint64_t claimed = back ? t - 1 : t + (1 << 16);
      if (ticket_.compare_exchange_weak(t, claimed, std::memory_order_acq_rel)) {
        *index = back ? end - 1 : front;
        return true;
      }
    }
  }

  void Work(uint64_t gen, const Job& j, bool back) {
    long i;
    while (Claim(gen, back, &i)) {
      j.RunChunk(i, back ? i - 1 : i + 1);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void Loop() {
    const auto spin = std::chrono::microseconds(EnvLong("TESSERA_CPU_KERNELS_SPIN_US", 2000));
    uint32_t seen = wake_.load();
    while (true) {
      auto start = std::chrono::steady_clock::now();
      long spins = 0;
      while (wake_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if ((++spins & 63) != 0 || std::chrono::steady_clock::now() - start < spin) continue;
        parked_.store(1, std::memory_order_seq_cst);
        if (wake_.load(std::memory_order_seq_cst) == seen) {
          syscall(SYS_futex, &wake_, FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
        }
        parked_.store(0, std::memory_order_seq_cst);
        start = std::chrono::steady_clock::now();
      }
      seen = wake_.load(std::memory_order_acquire);
      const uint64_t gen = ticket_.load(std::memory_order_acquire) >> 32;
      // Read before claiming: a chunk of `gen` is only claimed while job `gen` is running, and
      // its fields do not change until all of its chunks are done.
      const Job j = job_;
      Work(gen, j, /*back=*/true);
    }
  }

  Job job_{};
  std::atomic<uint64_t> ticket_{0};
  std::atomic<long> done_{0};
  std::atomic<uint32_t> wake_{0};  // futex word: bumped per job
  std::atomic<int> parked_{0};
  std::atomic_flag busy_ = ATOMIC_FLAG_INIT;
};

Helper* TheHelper() {
  // TESSERA_CPU_KERNELS_THREADS=1: the calling thread alone.
  static Helper* helper = EnvLong("TESSERA_CPU_KERNELS_THREADS", 2) > 1 ? new Helper() : nullptr;
  return helper;
}

void RunJob(const Job& job) {
  Helper* helper = TheHelper();
  if (helper != nullptr) {
    helper->Run(job);
    return;
  }
  for (long i = 0; i < job.nchunks; ++i) job.RunChunk(i, i + 1);
  job.Reduce();
}

namespace ffi = xla::ffi;

// x [M, K] and weights w_p [K, N_p] -> y_p [M, N_p], p < kMaxParts.
ffi::Error Dense(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                 ffi::RemainingRets ys) {
  if (ws.size() == 0 || ws.size() != ys.size() || ws.size() > kMaxParts) {
    return ffi::Error::InvalidArgument("tessera_cpu_dense: 1 to 8 weights, one output each");
  }
  Job job{};
  job.x = x.typed_data();
  for (size_t p = 0; p < ws.size(); ++p) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(p);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(p);
    if (!w.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("tessera_cpu_dense: float32 arrays only");
    }
    const auto dims = w->dimensions();
    if (dims.size() != 2) return ffi::Error::InvalidArgument("tessera_cpu_dense: w must be 2-D");
    const long K = dims[0], N = dims[1];
    if (p == 0) {
      if (K == 0 || x.element_count() % K != 0) {
        return ffi::Error::InvalidArgument("tessera_cpu_dense: x's size is not a multiple of K");
      }
      job.K = K;
      job.M = static_cast<long>(x.element_count()) / K;
    } else if (K != job.K) {
      return ffi::Error::InvalidArgument("tessera_cpu_dense: the weights' K differ");
    }
    Part part{w->typed_data(), (*y)->typed_data(), nullptr, N, kColChunk, 0, 0, job.nchunks, 0};
    if (job.M == 1) {
      part.count = (N + kColChunk - 1) / kColChunk;
    } else if (N > 0) {
      part.rows = std::max(8L, std::min(K, kRowChunkBytes / (4 * N)));
      const long blocks = (K + part.rows - 1) / part.rows;
      part.slice_rows = (blocks + kSlices - 1) / kSlices * part.rows;
      part.count = (K + part.slice_rows - 1) / part.slice_rows;
    }
    job.parts[p] = part;
    job.nchunks += part.count;
    job.nparts = p + 1;
  }
  if (job.M == 0 || job.nchunks == 0) return ffi::Error::Success();
  if (job.nchunks > 0xffff) return ffi::Error::InvalidArgument("tessera_cpu_dense: too large");
  // Slices 1.. of each product sum into this thread's arena (the helper writes there too).
  static thread_local std::vector<float> arena;
  long total = 0;
  for (int p = 0; p < job.nparts; ++p)
    total += std::max(0L, job.parts[p].count - 1) * job.M * job.parts[p].N;
  if (job.M > 1 && static_cast<long>(arena.size()) < total) arena.resize(total);
  for (long p = 0, offset = 0; job.M > 1 && p < job.nparts; ++p) {
    job.parts[p].sums = arena.data() + offset;
    offset += std::max(0L, job.parts[p].count - 1) * job.M * job.parts[p].N;
  }
  RunJob(job);
  return ffi::Error::Success();
}

// q [B, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], mask [B, S] -> out [B, Hq, Dv].
ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> out,
                           float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument("tessera_cpu_decode_attention: bad ranks");
  }
  Attention a{q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
              out->typed_data(), kd[0], kd[1], kd[2], 0, kd[3], vd[3], scale};
  if (a.Hkv == 0 || qd[1] % a.Hkv != 0 || qd[0] != a.B || qd[2] != a.D || vd[0] != a.B ||
      vd[1] != a.S || vd[2] != a.Hkv || mask.element_count() != static_cast<size_t>(a.B * a.S)) {
    return ffi::Error::InvalidArgument("tessera_cpu_decode_attention: shapes do not match");
  }
  a.G = qd[1] / a.Hkv;
  const long items = a.B * a.Hkv;
  if (items == 0) return ffi::Error::Success();
  Job job{};
  job.M = 1;
  job.attention = &a;
  job.items_per_chunk = std::max(1L, items / 16);
  job.nchunks = (items + job.items_per_chunk - 1) / job.items_per_chunk;
  RunJob(job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraCpuDense, Dense,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraCpuDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
