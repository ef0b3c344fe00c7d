// A minimal check harness for the C++ unit tests of the shared math (no test framework to install).
#pragma once

#include <cmath>
#include <cstdio>

static int g_failures = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                        \
    }                                                                      \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                                  \
  do {                                                                                                         \
    const double _a = (a), _b = (b);                                                                           \
    if (!(std::fabs(_a - _b) <= (tol) * (1.0 + std::fabs(_b)))) {                                              \
      std::printf("%s:%d: CHECK_NEAR failed: %s = %.17g vs %s = %.17g\n", __FILE__, __LINE__, #a, _a, #b, _b); \
      ++g_failures;                                                                                            \
    }                                                                                                          \
  } while (0)

inline int report(const char* name) {
  std::printf("%s: %s (%d failures)\n", name, g_failures ? "FAILED" : "passed", g_failures);
  return g_failures ? 1 : 0;
}
