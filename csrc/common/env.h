// Reading ICHIBAN_* environment variables. Every knob is documented in the
// README's table; a malformed value is an error naming the variable.
#pragma once

#include <cstdint>
#include <string>

namespace ichiban {

std::string env_str(const char* name, const std::string& fallback = "");
int64_t env_int(const char* name, int64_t fallback);
bool env_flag(const char* name, bool fallback = false);

}  // namespace ichiban
