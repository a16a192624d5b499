// _re2shim: the few RE2 calls _fastscan.c needs, behind a C interface.
//
// _fastscan.c runs whole-file regex scans (regex_scan, regex_count) without the GIL and
// without a Python call per line; RE2 is a C++ library, so this file compiles and matches
// patterns for it. Options mirror verify.compile_regex: never a newline in a match, no
// capture groups (only the whole match is reported), no logging.
#include <re2/re2.h>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

extern "C" {

// kdb_re2_new compiles `pattern`; on failure it returns NULL with RE2's message in `error`.
void *kdb_re2_new(const char *pattern, size_t len, int case_sensitive, int literal, char *error,
                  size_t error_cap) {
    RE2::Options options;
    options.set_never_nl(true);
    options.set_never_capture(true);
    options.set_log_errors(false);
    options.set_case_sensitive(case_sensitive != 0);
    options.set_literal(literal != 0);
    RE2 *re = new (std::nothrow) RE2(re2::StringPiece(pattern, len), options);
    if (re == nullptr) {
        std::snprintf(error, error_cap, "out of memory compiling the pattern");
        return nullptr;
    }
    if (!re->ok()) {
        std::snprintf(error, error_cap, "%s", re->error().c_str());
        delete re;
        return nullptr;
    }
    return re;
}

void kdb_re2_free(void *re) { delete static_cast<RE2 *>(re); }

// kdb_re2_match finds the leftmost-first match in data[pos:endpos] (the whole of data is the
// context for ^, $ and \b), like RE2::Match unanchored; 1 with its bounds, 0 when none.
int kdb_re2_match(const void *re, const char *data, size_t len, size_t pos, size_t endpos, size_t *start,
                  size_t *end) {
    re2::StringPiece text(data, len);
    re2::StringPiece found;
    if (!static_cast<const RE2 *>(re)->Match(text, pos, endpos, RE2::UNANCHORED, &found, 1)) {
        return 0;
    }
    *start = static_cast<size_t>(found.data() - data);
    *end = *start + found.size();
    return 1;
}

// kdb_re2_test says whether data[pos:endpos] holds a match (the context as kdb_re2_match's):
// asking for no bounds lets RE2 stop at the first match state, which is all a count needs.
int kdb_re2_test(const void *re, const char *data, size_t len, size_t pos, size_t endpos) {
    re2::StringPiece text(data, len);
    return static_cast<const RE2 *>(re)->Match(text, pos, endpos, RE2::UNANCHORED, nullptr, 0) ? 1 : 0;
}
}  // extern "C"
