#include "common/env.h"

#include <cstdlib>

#include "common/errors.h"

namespace ichiban {

std::string env_str(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::string(v) : fallback;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v, &end, 10);
  ICHIBAN_CHECK_ARG(errno == 0 && end && *end == '\0', "environment variable ", name, "='", v,
                    "' is not an integer");
  return static_cast<int64_t>(x);
}

bool env_flag(const char* name, bool fallback) {
  std::string v = env_str(name);
  if (v.empty()) return fallback;
  if (v == "1" || v == "true" || v == "TRUE" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "FALSE" || v == "no" || v == "off") return false;
  ICHIBAN_CHECK_ARG(false, "environment variable ", name, "='", v, "' is not a flag (expected 0 or 1)");
  return fallback;
}

}  // namespace ichiban
