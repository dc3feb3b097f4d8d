/* Preloaded into tritonserver by pagedllm's launcher: puts the admin key, read from the environment, where
 * tritonserver's arguments hold a placeholder, before its main() reads them. /proc/<pid>/cmdline, which every
 * user of the machine can read, keeps showing the placeholder; the environment is readable by the server's
 * own user only, and the key leaves it here so that the models' processes do not inherit it.
 * glibc calls a preloaded library's init_array entries with main's argc, argv and envp. */
#include <stdlib.h>
#include <string.h>

#define PLACEHOLDER "@PAGEDLLM_ADMIN_KEY@"
#define KEY_ENV "PAGEDLLM_ADMIN_KEY"

static void fill_admin_key(int argc, char** argv, char** envp) {
  (void)envp;
  const char* key = getenv(KEY_ENV);
  if (key == NULL) return;
  const size_t hole = strlen(PLACEHOLDER), key_len = strlen(key);
  for (int i = 0; i < argc; ++i) {
    const char* at = strstr(argv[i], PLACEHOLDER);
    if (at == NULL) continue;
    const size_t before = (size_t)(at - argv[i]), after = strlen(at + hole);
    char* filled = malloc(before + key_len + after + 1);
    if (filled == NULL) abort();
    memcpy(filled, argv[i], before);
    memcpy(filled + before, key, key_len);
    memcpy(filled + before + key_len, at + hole, after + 1);
    argv[i] = filled;
  }
  unsetenv(KEY_ENV);
}

__attribute__((section(".init_array"), used)) static void (*const fill_admin_key_entry)(int, char**, char**) =
    fill_admin_key;
