/*
 * test_api: tests of the dvl C ABI, run by scripts/ffi-check.sh (also under valgrind).
 *
 *   test_api [--gen-length N] [--steps N] MODEL_DIR [IMAGE_PATH]
 *
 * Every generation uses gen_length N (default 16) and N denoising steps per block (default
 * 8); fewer steps make the valgrind run affordable. Without IMAGE_PATH the image-file
 * generations are skipped (RGB8 buffers are still tested).
 * Covers: every dvl_status reachable from C with a bad argument (except DVL_ERR_INTERNAL,
 * which only a bug produces; the Rust unit tests cover its mapping), cancellation
 * mid-generation followed by a successful generation on the same context, two contexts
 * on one model on two threads giving the single-threaded tokens, loading from caller
 * memory, freeing a model before its contexts, and RGB8 buffers with padded strides.
 * Prints "test_api: N passed, M failed" and exits non-zero on any failure.
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dvl.h"

#define N_STATUS 21

static int g_pass, g_fail;
static int g_seen[N_STATUS];
static uint32_t G = 16;    /* gen_length of every generation here */
static uint32_t STEPS = 8; /* denoising steps per block */

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (cond) {                                                                        \
            g_pass++;                                                                      \
        } else {                                                                           \
            g_fail++;                                                                      \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                           \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, "\n");                                                         \
        }                                                                                  \
    } while (0)

static void expect(dvl_status got, dvl_status want, const char *call, int line) {
    if ((int)got >= 0 && (int)got < N_STATUS) {
        g_seen[got] = 1;
    }
    if (got == want) {
        g_pass++;
    } else {
        g_fail++;
        fprintf(stderr, "FAIL %s:%d: %s\n    returned %s, expected %s (last error: %s)\n",
                __FILE__, line, call, dvl_status_string(got), dvl_status_string(want),
                dvl_last_error(NULL));
    }
}

#define EXPECT(call, want) expect((call), (want), #call, __LINE__)

/* ---------------------------------------------------------------------------------- */
/* Helpers                                                                            */
/* ---------------------------------------------------------------------------------- */

static unsigned char *read_file(const char *dir, const char *name, size_t *size) {
    char path[4096];
    FILE *f;
    long n;
    unsigned char *buf;
    snprintf(path, sizeof path, "%s%s%s", dir, name[0] ? "/" : "", name);
    f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    buf = (unsigned char *)malloc((size_t)n + 1);
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf != NULL) {
        buf[n] = 0;
        *size = (size_t)n;
    }
    return buf;
}

/* A safetensors file: 8-byte little-endian header length, the JSON header, data bytes. */
static unsigned char *make_safetensors(const char *json, size_t data_len, size_t *size) {
    size_t n = strlen(json), i;
    unsigned char *b = (unsigned char *)calloc(8 + n + data_len, 1);
    if (b == NULL) {
        return NULL;
    }
    for (i = 0; i < 8; i++) {
        b[i] = (unsigned char)(((uint64_t)n >> (8 * i)) & 0xFF);
    }
    memcpy(b + 8, json, n);
    *size = 8 + n + data_len;
    return b;
}

static dvl_buffer buf_of(const void *data, size_t size) {
    dvl_buffer b;
    b.data = data;
    b.size = size;
    return b;
}

/* Streams a generation's commits into a window; optional hooks fire at a commit count. */
typedef struct run_state {
    uint32_t window[8192];
    uint32_t commits;
    dvl_context *ctx;
    const dvl_prompt *prompt;
    /* Cancel from inside the callback at this many commits (0 = never). */
    uint32_t cancel_in_callback_at;
    /* Hand over to a canceller thread at this many commits (0 = never). */
    uint32_t cancel_from_thread_at;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int requested, done;
    /* Re-entrant calls made from the callback, and their statuses. */
    int try_reentry;
    dvl_status reentry_generate, reentry_free;
} run_state;

static void run_state_init(run_state *s, dvl_context *ctx, const dvl_prompt *prompt) {
    uint32_t i;
    memset(s, 0, sizeof *s);
    for (i = 0; i < 8192; i++) {
        s->window[i] = DVL_MASK_ID;
    }
    s->ctx = ctx;
    s->prompt = prompt;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
}

static void run_state_destroy(run_state *s) {
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
}

static void on_token(uint32_t position, uint32_t token, const char *piece, void *user_data) {
    run_state *s = (run_state *)user_data;
    (void)piece;
    if (position < 8192) {
        s->window[position] = token;
    }
    s->commits++;
    if (s->try_reentry && s->commits == 1) {
        dvl_context *alias = s->ctx;
        s->reentry_generate = dvl_generate(s->ctx, s->prompt, NULL);
        s->reentry_free = dvl_context_free(&alias);
    }
    if (s->cancel_in_callback_at && s->commits == s->cancel_in_callback_at) {
        dvl_context_cancel(s->ctx);
    }
    if (s->cancel_from_thread_at && s->commits == s->cancel_from_thread_at) {
        pthread_mutex_lock(&s->mu);
        s->requested = 1;
        pthread_cond_broadcast(&s->cv);
        while (!s->done) {
            pthread_cond_wait(&s->cv, &s->mu);
        }
        pthread_mutex_unlock(&s->mu);
    }
}

static void *canceller(void *arg) {
    run_state *s = (run_state *)arg;
    pthread_mutex_lock(&s->mu);
    while (!s->requested && !s->done) {
        pthread_cond_wait(&s->cv, &s->mu);
    }
    if (s->requested) {
        EXPECT(dvl_context_cancel(s->ctx), DVL_OK);
    }
    s->done = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static dvl_generate_params gen_params(run_state *s) {
    dvl_generate_params gp;
    dvl_generate_default_params(&gp, sizeof gp);
    gp.gen_length = G;
    gp.steps = STEPS;
    gp.on_token = on_token;
    gp.user_data = s;
    return gp;
}

/* Generate and fetch the window; returns the status of dvl_generate. */
static dvl_status generate_ids(dvl_context *ctx, const dvl_prompt *prompt, uint32_t *ids) {
    run_state s;
    dvl_generate_params gp;
    dvl_status st;
    size_t n = 0;
    run_state_init(&s, ctx, prompt);
    gp = gen_params(&s);
    st = dvl_generate(ctx, prompt, &gp);
    if (st == DVL_OK) {
        EXPECT(dvl_context_get_ids(ctx, ids, G, &n), DVL_OK);
        CHECK(n == G, "got %zu ids, expected %u", n, (unsigned)G);
        CHECK(memcmp(ids, s.window, G * sizeof *ids) == 0,
              "streamed tokens differ from dvl_context_get_ids");
    }
    run_state_destroy(&s);
    return st;
}

static int same_ids(const uint32_t *a, const uint32_t *b) {
    return memcmp(a, b, G * sizeof *a) == 0;
}

/* Log sink: counts messages (from any thread), and the engine's panel-copy notice (a small
 * copy: DVL_LOG_DEBUG), which reaches the callback instead of stderr. */
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_log_count, g_log_errors, g_log_repacked, g_log_from_cache, g_log_cache_written;

static void on_log(dvl_log_level level, const char *message, void *user_data) {
    pthread_mutex_lock(&g_log_mu);
    g_log_count++;
    if (level == DVL_LOG_ERROR) {
        g_log_errors++;
    }
    if (level == DVL_LOG_DEBUG && strstr(message, "repacked into panels") != NULL) {
        g_log_repacked++;
    }
    /* The engine's own notices (the load's INFO line repeats the first). */
    if (level == DVL_LOG_DEBUG && strstr(message, "mapped from the panel cache") != NULL) {
        g_log_from_cache++;
    }
    if (level == DVL_LOG_DEBUG && strstr(message, "panel cache written") != NULL) {
        g_log_cache_written++;
    }
    if (user_data != NULL) {
        fprintf(stderr, "dvl[%d]: %s\n", (int)level, message);
    }
    pthread_mutex_unlock(&g_log_mu);
}

/* ---------------------------------------------------------------------------------- */
/* Tests                                                                              */
/* ---------------------------------------------------------------------------------- */

static void test_versions_and_params(void) {
    dvl_model_params mp;
    dvl_context_params cp;
    dvl_generate_params gp;

    CHECK(dvl_abi_version() == DVL_ABI_VERSION, "ABI %u != %u", (unsigned)dvl_abi_version(),
          (unsigned)DVL_ABI_VERSION);
    CHECK(strlen(dvl_version_string()) > 0, "empty version string");
    CHECK(strcmp(dvl_status_string(DVL_ERR_IO), "DVL_ERR_IO") == 0, "status name");
    CHECK(strcmp(dvl_status_string(DVL_OK), "DVL_OK") == 0, "status name");
    CHECK(strcmp(dvl_status_string(12345), "DVL_ERR_UNKNOWN") == 0, "unknown status name");
    CHECK(strcmp(dvl_status_string(-1), "DVL_ERR_UNKNOWN") == 0, "negative status name");

    EXPECT(dvl_log_set(on_log, 9, NULL), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_log_set(on_log, DVL_LOG_DEBUG, NULL), DVL_OK);

    EXPECT(dvl_model_default_params(NULL, sizeof mp), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_model_default_params(&mp, 3), DVL_ERR_STRUCT_SIZE);
    EXPECT(dvl_model_default_params(&mp, sizeof mp + 8), DVL_ERR_STRUCT_SIZE);
    EXPECT(dvl_model_default_params(&mp, sizeof mp), DVL_OK);
    CHECK(mp.struct_size == sizeof mp && mp.max_image_pixels == 0, "model defaults");

    EXPECT(dvl_context_default_params(NULL, sizeof cp), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_context_default_params(&cp, 0), DVL_ERR_STRUCT_SIZE);
    EXPECT(dvl_context_default_params(&cp, sizeof cp), DVL_OK);
    CHECK(cp.struct_size == sizeof cp && cp.n_threads == 0 && cp.bf16_matmul == 0,
          "context defaults");

    EXPECT(dvl_generate_default_params(&gp, sizeof gp - 1), DVL_ERR_STRUCT_SIZE);
    EXPECT(dvl_generate_default_params(&gp, sizeof gp), DVL_OK);
    CHECK(gp.struct_size == sizeof gp && gp.gen_length == 128 && gp.steps == 8 &&
              gp.block_size == 0 && gp.strategy == DVL_STRATEGY_LOW_CONFIDENCE_STATIC &&
              gp.temperature == 0.0f && gp.top_k == 0 && gp.top_p == 1.0f &&
              gp.fuse_commit == 1 && gp.on_token == NULL,
          "generate defaults mirror the CLI's");
}

static void test_load_errors(const char *model_dir) {
    dvl_model *m = (dvl_model *)&m; /* must be reset to NULL on failure */
    dvl_model_params mp;

    EXPECT(dvl_model_load(NULL, NULL, &m), DVL_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL, "*out is NULL after a failed load");
    EXPECT(dvl_model_load(model_dir, NULL, NULL), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_model_load("/nonexistent/dvl-model", NULL, &m), DVL_ERR_IO);
    CHECK(strstr(dvl_last_error(NULL), "/nonexistent/dvl-model") != NULL,
          "the error names the path: %s", dvl_last_error(NULL));
    dvl_model_default_params(&mp, sizeof mp);
    mp.struct_size = 4;
    EXPECT(dvl_model_load(model_dir, &mp, &m), DVL_ERR_STRUCT_SIZE);
    dvl_model_default_params(&mp, sizeof mp);
    mp.reserved = 1;
    EXPECT(dvl_model_load(model_dir, &mp, &m), DVL_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL, "no model on failure");
}

/* Loads from caller memory: every model-format status, then a working model. */
static dvl_model *test_memory_loads(const char *model_dir, unsigned char **keep_shard) {
    size_t cfg_n = 0, shard_n = 0, tok_n = 0, n = 0;
    unsigned char *cfg = read_file(model_dir, "config.json", &cfg_n);
    unsigned char *shard = read_file(model_dir, "model.safetensors", &shard_n);
    unsigned char *tok = read_file(model_dir, "tokenizer.json", &tok_n);
    unsigned char *bad = NULL;
    char *cfg2 = NULL, *p;
    dvl_buffer c, t, s[2];
    dvl_model *m = NULL, *no_tok = NULL;
    dvl_context *ctx = NULL;
    dvl_prompt *prompt = NULL;
    uint32_t ids[8192];
    char piece[64];
    size_t len = 0;

    *keep_shard = NULL;
    CHECK(cfg != NULL && shard != NULL && tok != NULL, "cannot read the model files");
    if (cfg == NULL || shard == NULL || tok == NULL) {
        free(cfg);
        free(shard);
        free(tok);
        return NULL;
    }
    c = buf_of(cfg, cfg_n);
    t = buf_of(tok, tok_n);
    s[0] = buf_of(shard, shard_n);

    EXPECT(dvl_model_load_from_memory(NULL, s, 1, &t, NULL, &m), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_model_load_from_memory(&c, NULL, 1, &t, NULL, &m), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_model_load_from_memory(&c, s, 0, &t, NULL, &m), DVL_ERR_INVALID_ARGUMENT);
    s[1] = buf_of(NULL, 5);
    EXPECT(dvl_model_load_from_memory(&c, s + 1, 1, &t, NULL, &m), DVL_ERR_INVALID_ARGUMENT);
    {
        dvl_buffer j = buf_of("not json", 8);
        EXPECT(dvl_model_load_from_memory(&j, s, 1, &t, NULL, &m), DVL_ERR_CONFIG);
    }
    {
        const char *llama = "{\"model_type\":\"llama\"}";
        dvl_buffer j = buf_of(llama, strlen(llama));
        EXPECT(dvl_model_load_from_memory(&j, s, 1, &t, NULL, &m), DVL_ERR_UNSUPPORTED_MODEL);
    }
    s[1] = buf_of(shard, 4);
    EXPECT(dvl_model_load_from_memory(&c, s + 1, 1, &t, NULL, &m), DVL_ERR_TRUNCATED);

    bad = make_safetensors("notjson!", 0, &n);
    s[1] = buf_of(bad, n);
    EXPECT(dvl_model_load_from_memory(&c, s + 1, 1, &t, NULL, &m), DVL_ERR_BAD_HEADER);
    free(bad);
    bad = make_safetensors("{\"w\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, &n);
    s[1] = buf_of(bad, n);
    EXPECT(dvl_model_load_from_memory(&c, s + 1, 1, &t, NULL, &m), DVL_ERR_WRONG_DTYPE);
    free(bad);
    bad = make_safetensors("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, &n);
    s[1] = buf_of(bad, n);
    EXPECT(dvl_model_load_from_memory(&c, s + 1, 1, &t, NULL, &m), DVL_ERR_BAD_OFFSETS);
    free(bad);
    bad = make_safetensors("{}", 0, &n);
    s[1] = buf_of(bad, n);
    EXPECT(dvl_model_load_from_memory(&c, s + 1, 1, &t, NULL, &m), DVL_ERR_MISSING_TENSOR);
    free(bad);

    /* The same shard twice: every tensor is in two shards. */
    s[1] = s[0];
    EXPECT(dvl_model_load_from_memory(&c, s, 2, &t, NULL, &m), DVL_ERR_INDEX);

    /* A config whose MLP width disagrees with the weights. */
    cfg2 = (char *)malloc(cfg_n + 1);
    if (cfg2 != NULL) {
        dvl_buffer j;
        int replaced = 0;
        memcpy(cfg2, cfg, cfg_n + 1);
        for (p = strstr(cfg2, "\"intermediate_size\": 160"); p != NULL;
             p = strstr(p + 1, "\"intermediate_size\": 160")) {
            memcpy(p + strlen("\"intermediate_size\": "), "128", 3);
            replaced++;
        }
        CHECK(replaced > 0, "tiny config has no \"intermediate_size\": 160 to change");
        j = buf_of(cfg2, cfg_n);
        EXPECT(dvl_model_load_from_memory(&j, s, 1, &t, NULL, &m), DVL_ERR_WRONG_SHAPE);
        free(cfg2);
    }
    {
        dvl_buffer j = buf_of("{", 1);
        EXPECT(dvl_model_load_from_memory(&c, s, 1, &j, NULL, &m), DVL_ERR_TOKENIZER);
    }
    CHECK(m == NULL, "no model after failed loads");

    /* Without a tokenizer: loads, but nothing can be encoded. */
    EXPECT(dvl_model_load_from_memory(&c, s, 1, NULL, NULL, &no_tok), DVL_OK);
    EXPECT(dvl_model_token_text(no_tok, 100, piece, sizeof piece, &len), DVL_ERR_TOKENIZER);
    EXPECT(dvl_context_new(no_tok, NULL, &ctx), DVL_OK);
    EXPECT(dvl_prompt_new("Hello", &prompt), DVL_OK);
    EXPECT(generate_ids(ctx, prompt, ids), DVL_ERR_TOKENIZER);
    CHECK(strstr(dvl_last_error(ctx), "tokenizer") != NULL, "context error: %s",
          dvl_last_error(ctx));
    EXPECT(dvl_context_free(&ctx), DVL_OK);
    EXPECT(dvl_model_free(&no_tok), DVL_OK);
    EXPECT(dvl_prompt_free(&prompt), DVL_OK);

    /* The working model: the shard stays alive (the caller keeps it) until it is freed. */
    EXPECT(dvl_model_load_from_memory(&c, s, 1, &t, NULL, &m), DVL_OK);
    free(cfg);
    free(tok);
    *keep_shard = shard;
    return m;
}

/* Weight layouts: as stored (nothing copied) and in panels (a copy) load, report their
 * copy's size and answer alike. */
static void test_weight_layouts(const char *model_dir) {
    static uint32_t as_stored[8192], in_panels[8192];
    dvl_model_params mp;
    dvl_model *stored = NULL, *panels = NULL;
    dvl_context *ctx = NULL;
    dvl_prompt *prompt = NULL;
    uint64_t bytes = 1;

    dvl_model_default_params(&mp, sizeof mp);
    CHECK(mp.weight_layout == DVL_WEIGHTS_AUTO && mp.reserved2 == 0, "layout defaults");
    mp.weight_layout = 3;
    EXPECT(dvl_model_load(model_dir, &mp, &stored), DVL_ERR_INVALID_ARGUMENT);
    CHECK(strstr(dvl_last_error(NULL), "weight_layout") != NULL, "error names the field: %s",
          dvl_last_error(NULL));
    mp.weight_layout = DVL_WEIGHTS_AS_STORED;
    EXPECT(dvl_model_load(model_dir, &mp, &stored), DVL_OK);
    /* The engine's notice is DEBUG for a small copy: not delivered at INFO, once at DEBUG. */
    mp.weight_layout = DVL_WEIGHTS_PANELS;
    pthread_mutex_lock(&g_log_mu);
    g_log_repacked = 0;
    pthread_mutex_unlock(&g_log_mu);
    EXPECT(dvl_log_set(on_log, DVL_LOG_INFO, NULL), DVL_OK);
    EXPECT(dvl_model_load(model_dir, &mp, &panels), DVL_OK);
    dvl_model_free(&panels);
    EXPECT(dvl_log_set(on_log, DVL_LOG_DEBUG, NULL), DVL_OK);
    EXPECT(dvl_model_load(model_dir, &mp, &panels), DVL_OK);
    pthread_mutex_lock(&g_log_mu);
    CHECK(g_log_repacked == 1, "the engine's panel notice reached the log callback %d times",
          g_log_repacked);
    pthread_mutex_unlock(&g_log_mu);
    if (stored == NULL || panels == NULL) {
        dvl_model_free(&stored);
        dvl_model_free(&panels);
        return;
    }
    EXPECT(dvl_model_panel_bytes(stored, NULL), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_model_panel_bytes(NULL, &bytes), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_model_panel_bytes(stored, &bytes), DVL_OK);
    CHECK(bytes == 0, "weights as stored have no copy (%llu bytes)", (unsigned long long)bytes);
    EXPECT(dvl_model_panel_bytes(panels, &bytes), DVL_OK);
    CHECK(bytes > 0, "weights in panels report their copy");

    EXPECT(dvl_prompt_new("What is two plus two?", &prompt), DVL_OK);
    EXPECT(dvl_context_new(stored, NULL, &ctx), DVL_OK);
    EXPECT(generate_ids(ctx, prompt, as_stored), DVL_OK);
    EXPECT(dvl_context_free(&ctx), DVL_OK);
    EXPECT(dvl_context_new(panels, NULL, &ctx), DVL_OK);
    EXPECT(generate_ids(ctx, prompt, in_panels), DVL_OK);
    EXPECT(dvl_context_free(&ctx), DVL_OK);
    CHECK(same_ids(as_stored, in_panels), "as stored and in panels give the same ids");
    EXPECT(dvl_prompt_free(&prompt), DVL_OK);
    EXPECT(dvl_model_free(&stored), DVL_OK);
    EXPECT(dvl_model_free(&panels), DVL_OK);
}

/* The panel cache: the first load writes the checkpoint's file into the directory, the
 * second maps it; both answer as a load without it. Cleans up after itself. */
static void test_panel_cache(const char *model_dir) {
    static uint32_t plain[8192], written[8192], mapped[8192];
    char dir[256], file[512];
    dvl_model_params mp;
    dvl_model *models[3] = {NULL, NULL, NULL};
    uint32_t *ids[3] = {plain, written, mapped};
    dvl_prompt *prompt = NULL;
    DIR *d;
    struct dirent *e;
    int files = 0, i;

    snprintf(dir, sizeof dir, "/tmp/dvl-test-api-cache-%ld", (long)getpid());
    CHECK(mkdir(dir, 0700) == 0, "mkdir %s", dir);
    dvl_model_default_params(&mp, sizeof mp);
    CHECK(mp.panel_cache_dir == NULL, "no panel cache by default");
    mp.weight_layout = DVL_WEIGHTS_PANELS;
    EXPECT(dvl_model_load(model_dir, &mp, &models[0]), DVL_OK);
    mp.panel_cache_dir = dir;
    pthread_mutex_lock(&g_log_mu);
    g_log_from_cache = g_log_cache_written = 0;
    pthread_mutex_unlock(&g_log_mu);
    EXPECT(dvl_log_set(on_log, DVL_LOG_DEBUG, NULL), DVL_OK);
    EXPECT(dvl_model_load(model_dir, &mp, &models[1]), DVL_OK);
    EXPECT(dvl_model_load(model_dir, &mp, &models[2]), DVL_OK);
    pthread_mutex_lock(&g_log_mu);
    CHECK(g_log_cache_written == 1 && g_log_from_cache == 1,
          "one load wrote the panel cache (%d), the next mapped it (%d)", g_log_cache_written,
          g_log_from_cache);
    pthread_mutex_unlock(&g_log_mu);

    EXPECT(dvl_prompt_new("What is two plus two?", &prompt), DVL_OK);
    for (i = 0; i < 3; i++) {
        dvl_context *ctx = NULL;
        if (models[i] == NULL) {
            continue;
        }
        EXPECT(dvl_context_new(models[i], NULL, &ctx), DVL_OK);
        EXPECT(generate_ids(ctx, prompt, ids[i]), DVL_OK);
        EXPECT(dvl_context_free(&ctx), DVL_OK);
        EXPECT(dvl_model_free(&models[i]), DVL_OK);
    }
    CHECK(same_ids(plain, written) && same_ids(plain, mapped),
          "the same ids with and without the panel cache");
    EXPECT(dvl_prompt_free(&prompt), DVL_OK);

    d = opendir(dir);
    while (d != NULL && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') {
            continue;
        }
        files++;
        snprintf(file, sizeof file, "%s/%s", dir, e->d_name);
        CHECK(strstr(e->d_name, ".dvlpanels") != NULL, "only cache files: %s", e->d_name);
        CHECK(unlink(file) == 0, "unlink %s", file);
    }
    if (d != NULL) {
        closedir(d);
    }
    CHECK(files == 1, "one cache file (%d)", files);
    CHECK(rmdir(dir) == 0, "rmdir %s", dir);
}

static void test_context_and_prompt(dvl_model *model) {
    dvl_context *ctx = (dvl_context *)&ctx;
    dvl_context_params cp;
    dvl_prompt *prompt = NULL, *p2 = (dvl_prompt *)&p2;
    unsigned char pixels[4 * 4 * 3];
    uint32_t n_threads = 0;
    char text[8];
    uint32_t ids[4];
    size_t len = 0;
    dvl_generation_stats stats;

    memset(pixels, 128, sizeof pixels);
    EXPECT(dvl_context_new(NULL, NULL, &ctx), DVL_ERR_INVALID_ARGUMENT);
    CHECK(ctx == NULL, "*out is NULL after a failed dvl_context_new");
    EXPECT(dvl_context_new(model, NULL, NULL), DVL_ERR_INVALID_ARGUMENT);
    dvl_context_default_params(&cp, sizeof cp);
    cp.n_threads = 5000;
    EXPECT(dvl_context_new(model, &cp, &ctx), DVL_ERR_INVALID_ARGUMENT);
    cp.n_threads = 1;
    cp.bf16_matmul = 2;
    EXPECT(dvl_context_new(model, &cp, &ctx), DVL_ERR_INVALID_ARGUMENT);
    CHECK(strstr(dvl_last_error(NULL), "bf16_matmul") != NULL, "bf16 error: %s",
          dvl_last_error(NULL));
    cp.bf16_matmul = 0;
    cp.struct_size = 0;
    EXPECT(dvl_context_new(model, &cp, &ctx), DVL_ERR_STRUCT_SIZE);
    /* A caller built against the first header (no bf16_matmul) is still accepted. */
    cp.struct_size = offsetof(dvl_context_params, bf16_matmul);
    cp.bf16_matmul = 1; /* past its struct_size: must not be read */
    EXPECT(dvl_context_new(model, &cp, &ctx), DVL_OK);
    EXPECT(dvl_context_free(&ctx), DVL_OK);
    cp.bf16_matmul = 1;
    cp.struct_size = sizeof cp;
    EXPECT(dvl_context_new(model, &cp, &ctx), DVL_OK);
    EXPECT(dvl_context_free(&ctx), DVL_OK);
    cp.bf16_matmul = 0;

    EXPECT(dvl_prompt_new(NULL, &prompt), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_prompt_new("\xff\xfe not UTF-8", &p2), DVL_ERR_INVALID_ARGUMENT);
    CHECK(p2 == NULL, "*out is NULL after a failed dvl_prompt_new");
    EXPECT(dvl_prompt_new("Describe this image.", &prompt), DVL_OK);

    /* A handle of the wrong kind is recognised, not used. */
    EXPECT(dvl_context_new((const dvl_model *)prompt, &cp, &ctx), DVL_ERR_INVALID_HANDLE);
    EXPECT(dvl_context_new(model, &cp, &ctx), DVL_OK);
    EXPECT(dvl_context_n_threads(ctx, &n_threads), DVL_OK);
    CHECK(n_threads == 1, "n_threads %u", (unsigned)n_threads);
    EXPECT(dvl_context_n_threads(ctx, NULL), DVL_ERR_INVALID_ARGUMENT);
    CHECK(strstr(dvl_last_error(ctx), "out is NULL") != NULL, "context error: %s",
          dvl_last_error(ctx));
    EXPECT(dvl_generate(ctx, (const dvl_prompt *)ctx, NULL), DVL_ERR_INVALID_HANDLE);
    {
        dvl_context *bogus = (dvl_context *)prompt;
        EXPECT(dvl_context_free(&bogus), DVL_ERR_INVALID_HANDLE);
        CHECK(bogus == (dvl_context *)prompt, "a rejected free leaves the variable");
    }

    EXPECT(dvl_prompt_set_raw(NULL, 1), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_prompt_add_image_file(prompt, NULL), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_prompt_add_image_file(NULL, "x.png"), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_prompt_add_image_rgb8(prompt, pixels, 0, 4, 0), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_prompt_add_image_rgb8(prompt, pixels, 4, 4, 5), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_prompt_add_image_rgb8(prompt, NULL, 4, 4, 0), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_prompt_add_image_encoded(prompt, pixels, 0), DVL_ERR_INVALID_ARGUMENT);

    /* Nothing generated yet. */
    EXPECT(dvl_context_get_text(ctx, text, sizeof text, &len), DVL_ERR_NO_RESULT);
    EXPECT(dvl_context_get_ids(ctx, ids, 4, &len), DVL_ERR_NO_RESULT);
    EXPECT(dvl_context_get_stats(ctx, &stats, sizeof stats), DVL_ERR_NO_RESULT);
    EXPECT(dvl_context_get_text(NULL, text, sizeof text, &len), DVL_ERR_INVALID_ARGUMENT);

    EXPECT(dvl_context_cancel(NULL), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_context_free(NULL), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_context_free(&ctx), DVL_OK);
    CHECK(ctx == NULL, "free sets the variable to NULL");
    EXPECT(dvl_context_free(&ctx), DVL_OK); /* second free through it: a no-op */
    EXPECT(dvl_prompt_free(&prompt), DVL_OK);
    EXPECT(dvl_prompt_free(&prompt), DVL_OK);
}

typedef struct thread_job {
    dvl_context *ctx;
    const dvl_prompt *prompt;
    uint32_t ids[8192];
    dvl_status st;
} thread_job;

static void *thread_generate(void *arg) {
    thread_job *j = (thread_job *)arg;
    j->st = generate_ids(j->ctx, j->prompt, j->ids);
    return NULL;
}

static void test_generation(dvl_model *model, dvl_model **mem_model, const char *model_dir,
                            const char *image) {
    dvl_context *ctx = NULL, *ctx2 = NULL;
    dvl_context_params cp;
    dvl_generate_params gp;
    dvl_generation_stats stats;
    dvl_prompt *prompt = NULL, *bad_img = NULL, *not_img = NULL;
    uint32_t base[8192], ids[8192];
    run_state s;
    char *text = NULL;
    size_t len = 0, n = 0;
    char path[4096];

    dvl_context_default_params(&cp, sizeof cp);
    cp.n_threads = 1;
    EXPECT(dvl_context_new(model, &cp, &ctx), DVL_OK);
    EXPECT(dvl_prompt_new("Describe this image.", &prompt), DVL_OK);
    if (ctx == NULL || prompt == NULL) {
        return;
    }

    /* The single-threaded reference run. */
    EXPECT(generate_ids(ctx, prompt, base), DVL_OK);
    EXPECT(dvl_context_get_ids(ctx, ids, 1, &n), DVL_ERR_BUFFER_TOO_SMALL);
    CHECK(n == G, "needed count %zu", n);
    CHECK(strstr(dvl_last_error(ctx), "buffer") != NULL, "context error: %s",
          dvl_last_error(ctx));
    EXPECT(dvl_context_get_text(ctx, NULL, 0, &len), DVL_ERR_BUFFER_TOO_SMALL);
    text = (char *)malloc(len + 1);
    if (text != NULL) {
        EXPECT(dvl_context_get_text(ctx, text, len + 1, &n), DVL_OK);
        CHECK(strlen(text) == len && n == len, "text length %zu vs %zu", strlen(text), len);
        free(text);
    }
    EXPECT(dvl_context_get_stats(ctx, &stats, 2), DVL_ERR_STRUCT_SIZE);
    EXPECT(dvl_context_get_stats(ctx, &stats, sizeof stats), DVL_OK);
    CHECK(stats.struct_size == sizeof stats && stats.n_ids == G && stats.forward_passes > 0 &&
              stats.prompt_rows > 0,
          "stats");
    {
        char piece[256];
        EXPECT(dvl_model_token_text(model, base[0], NULL, 0, &len), DVL_ERR_BUFFER_TOO_SMALL);
        EXPECT(dvl_model_token_text(model, base[0], piece, sizeof piece, &len), DVL_OK);
        CHECK(strlen(piece) == len, "token text length");
        EXPECT(dvl_model_token_text(model, base[0], NULL, 16, &len), DVL_ERR_INVALID_ARGUMENT);
    }

    /* Bad generation arguments. */
    run_state_init(&s, ctx, prompt);
    gp = gen_params(&s);
    gp.gen_length = 0;
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_context_get_ids(ctx, ids, G, &n), DVL_ERR_NO_RESULT); /* result cleared */
    gp.gen_length = 100000000;
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_INVALID_ARGUMENT);
    CHECK(strstr(dvl_last_error(ctx), "gen_length") != NULL, "error: %s", dvl_last_error(ctx));
    gp = gen_params(&s);
    gp.steps = 0;
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_INVALID_ARGUMENT);
    gp = gen_params(&s);
    gp.strategy = 9;
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_INVALID_ARGUMENT);
    gp = gen_params(&s);
    gp.top_p = 0.0f;
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_INVALID_ARGUMENT);
    gp = gen_params(&s);
    gp.struct_size = 12;
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_STRUCT_SIZE);
    gp = gen_params(&s);
    EXPECT(dvl_generate(ctx, NULL, &gp), DVL_ERR_INVALID_ARGUMENT);
    EXPECT(dvl_generate(NULL, prompt, &gp), DVL_ERR_INVALID_ARGUMENT);
    CHECK(s.commits == 0, "no tokens from failed calls");
    run_state_destroy(&s);

    /* Bad images: a missing file, and a file that is not an image. */
    EXPECT(dvl_prompt_new("Describe this image.", &bad_img), DVL_OK);
    EXPECT(dvl_prompt_add_image_file(bad_img, "/nonexistent/image.png"), DVL_OK);
    EXPECT(generate_ids(ctx, bad_img, ids), DVL_ERR_IO);
    EXPECT(dvl_prompt_new("Describe this image.", &not_img), DVL_OK);
    snprintf(path, sizeof path, "%s/config.json", model_dir);
    EXPECT(dvl_prompt_add_image_file(not_img, path), DVL_OK);
    EXPECT(generate_ids(ctx, not_img, ids), DVL_ERR_IMAGE);
    EXPECT(dvl_prompt_free(&bad_img), DVL_OK);
    EXPECT(dvl_prompt_free(&not_img), DVL_OK);

    /* Re-entrant calls from the token callback are refused, not crashes. */
    run_state_init(&s, ctx, prompt);
    s.try_reentry = 1;
    gp = gen_params(&s);
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_OK);
    EXPECT(s.reentry_generate, DVL_ERR_BUSY);
    EXPECT(s.reentry_free, DVL_ERR_BUSY);
    CHECK(same_ids(s.window, base), "tokens after re-entrant calls");
    run_state_destroy(&s);

    /* A cancel while idle has no effect on the next generation. */
    EXPECT(dvl_context_cancel(ctx), DVL_OK);
    EXPECT(generate_ids(ctx, prompt, ids), DVL_OK);
    CHECK(same_ids(ids, base), "tokens after an idle cancel");

    /* Cancel from the callback, then generate again on the same context. */
    run_state_init(&s, ctx, prompt);
    s.cancel_in_callback_at = 3;
    gp = gen_params(&s);
    EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_CANCELLED);
    CHECK(s.commits >= 3 && s.commits < G, "cancelled after %u commits", (unsigned)s.commits);
    EXPECT(dvl_context_get_ids(ctx, ids, G, &n), DVL_ERR_NO_RESULT);
    run_state_destroy(&s);
    EXPECT(generate_ids(ctx, prompt, ids), DVL_OK);
    CHECK(same_ids(ids, base), "tokens after a cancelled generation");

    /* Cancel from a second thread mid-generation, then generate again. */
    {
        pthread_t th;
        run_state_init(&s, ctx, prompt);
        s.cancel_from_thread_at = 2;
        gp = gen_params(&s);
        CHECK(pthread_create(&th, NULL, canceller, &s) == 0, "pthread_create");
        EXPECT(dvl_generate(ctx, prompt, &gp), DVL_ERR_CANCELLED);
        pthread_mutex_lock(&s.mu);
        s.done = 1;
        pthread_cond_broadcast(&s.cv);
        pthread_mutex_unlock(&s.mu);
        pthread_join(th, NULL);
        CHECK(s.commits >= 2 && s.commits < G, "cancelled after %u commits",
              (unsigned)s.commits);
        CHECK(strstr(dvl_last_error(ctx), "cancel") != NULL, "error: %s",
              dvl_last_error(ctx));
        run_state_destroy(&s);
        EXPECT(generate_ids(ctx, prompt, ids), DVL_OK);
        CHECK(same_ids(ids, base), "tokens after a cancel from another thread");
    }

    /* Two contexts on one model, on two threads at once (different thread counts). */
    {
        static thread_job a, b;
        pthread_t ta, tb;
        dvl_context *ctx_a = NULL, *ctx_b = NULL;
        cp.n_threads = 1;
        EXPECT(dvl_context_new(model, &cp, &ctx_a), DVL_OK);
        cp.n_threads = 2;
        EXPECT(dvl_context_new(model, &cp, &ctx_b), DVL_OK);
        a.ctx = ctx_a;
        b.ctx = ctx_b;
        a.prompt = b.prompt = prompt;
        a.st = b.st = DVL_ERR_INTERNAL;
        CHECK(pthread_create(&ta, NULL, thread_generate, &a) == 0, "pthread_create");
        CHECK(pthread_create(&tb, NULL, thread_generate, &b) == 0, "pthread_create");
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        EXPECT(a.st, DVL_OK);
        EXPECT(b.st, DVL_OK);
        CHECK(same_ids(a.ids, base), "thread A's tokens equal the single-threaded run");
        CHECK(same_ids(b.ids, base), "thread B's tokens equal the single-threaded run");
        EXPECT(dvl_context_free(&ctx_a), DVL_OK);
        EXPECT(dvl_context_free(&ctx_b), DVL_OK);
    }

    /* The model loaded from caller memory gives the same tokens, also after its handle is
     * freed: the context keeps the weights alive. */
    if (*mem_model != NULL) {
        EXPECT(dvl_context_new(*mem_model, &cp, &ctx2), DVL_OK);
        EXPECT(dvl_model_free(mem_model), DVL_OK);
        CHECK(*mem_model == NULL, "free sets the variable to NULL");
        EXPECT(generate_ids(ctx2, prompt, ids), DVL_OK);
        CHECK(same_ids(ids, base), "memory-loaded model's tokens after its handle was freed");
        EXPECT(dvl_context_free(&ctx2), DVL_OK);
    }

    /* Images: a file, its encoded bytes, and RGB8 buffers with tight and padded strides. */
    if (image != NULL) {
        dvl_prompt *pf = NULL, *pe = NULL;
        uint32_t ids_f[8192];
        size_t sz = 0;
        unsigned char *bytes = read_file(image, "", &sz);
        dvl_status st;
        EXPECT(dvl_prompt_new("Describe this image.", &pf), DVL_OK);
        EXPECT(dvl_prompt_add_image_file(pf, image), DVL_OK);
        st = generate_ids(ctx, pf, ids_f);
        EXPECT(st, DVL_OK);
        CHECK(bytes != NULL, "cannot read %s", image);
        if (st == DVL_OK && bytes != NULL) {
            EXPECT(dvl_prompt_new("Describe this image.", &pe), DVL_OK);
            EXPECT(dvl_prompt_add_image_encoded(pe, bytes, sz), DVL_OK);
            EXPECT(generate_ids(ctx, pe, ids), DVL_OK);
            CHECK(same_ids(ids, ids_f), "encoded bytes give the file's tokens");
        }
        free(bytes);
        dvl_prompt_free(&pf);
        dvl_prompt_free(&pe);
    }
    {
        enum { W = 56, H = 42, PAD = 13 };
        static unsigned char tight[W * H * 3], padded[H * (W * 3 + PAD)];
        dvl_prompt *pt = NULL, *pp = NULL;
        uint32_t ids_t[8192];
        int x, y, k;
        for (y = 0; y < H; y++) {
            for (x = 0; x < W; x++) {
                for (k = 0; k < 3; k++) {
                    unsigned char v = (unsigned char)((x * 4 + y * 3 + k * 80) & 0xFF);
                    tight[(y * W + x) * 3 + k] = v;
                    padded[y * (W * 3 + PAD) + x * 3 + k] = v;
                }
            }
            memset(padded + y * (W * 3 + PAD) + W * 3, 0xAB, PAD);
        }
        EXPECT(dvl_prompt_new("Describe this image.", &pt), DVL_OK);
        EXPECT(dvl_prompt_add_image_rgb8(pt, tight, W, H, 0), DVL_OK);
        EXPECT(dvl_prompt_new("Describe this image.", &pp), DVL_OK);
        EXPECT(dvl_prompt_add_image_rgb8(pp, padded, W, H, W * 3 + PAD), DVL_OK);
        EXPECT(generate_ids(ctx, pt, ids_t), DVL_OK);
        EXPECT(generate_ids(ctx, pp, ids), DVL_OK);
        CHECK(same_ids(ids, ids_t), "a padded stride gives the tight buffer's tokens");
        dvl_prompt_free(&pt);
        dvl_prompt_free(&pp);
    }

    EXPECT(dvl_model_free(NULL), DVL_ERR_INVALID_ARGUMENT);
    {
        dvl_model *bogus = (dvl_model *)ctx;
        EXPECT(dvl_model_free(&bogus), DVL_ERR_INVALID_HANDLE);
    }
    EXPECT(dvl_prompt_free(&prompt), DVL_OK);
    EXPECT(dvl_context_free(&ctx), DVL_OK);
}

int main(int argc, char **argv) {
    const char *model_dir = NULL, *image = NULL;
    dvl_model *model = NULL, *mem_model = NULL;
    unsigned char *shard = NULL;
    int i;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--gen-length") == 0 && i + 1 < argc) {
            G = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            STEPS = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (model_dir == NULL) {
            model_dir = argv[i];
        } else if (image == NULL) {
            image = argv[i];
        }
    }
    if (model_dir == NULL || G == 0 || G > 8192 || STEPS == 0) {
        fprintf(stderr, "usage: test_api [--gen-length N] [--steps N] MODEL_DIR [IMAGE_PATH]\n");
        return 2;
    }

    test_versions_and_params();
    test_load_errors(model_dir);
    test_weight_layouts(model_dir);
    test_panel_cache(model_dir);
    mem_model = test_memory_loads(model_dir, &shard);
    EXPECT(dvl_model_load(model_dir, NULL, &model), DVL_OK);
    if (model != NULL) {
        test_context_and_prompt(model);
        test_generation(model, &mem_model, model_dir, image);
    }

    EXPECT(dvl_model_free(&model), DVL_OK);
    EXPECT(dvl_model_free(&model), DVL_OK); /* no-op through the same variable */
    EXPECT(dvl_model_free(&mem_model), DVL_OK);
    free(shard); /* only now: the memory-loaded model and its contexts are gone */

    pthread_mutex_lock(&g_log_mu);
    CHECK(g_log_count > 0 && g_log_errors > 0, "log callback saw %d messages (%d errors)",
          g_log_count, g_log_errors);
    pthread_mutex_unlock(&g_log_mu);
    EXPECT(dvl_log_set(NULL, 0, NULL), DVL_OK);

    /* Every status but DVL_ERR_INTERNAL must have been produced by a call above. */
    for (i = 0; i < N_STATUS; i++) {
        if (i == DVL_ERR_INTERNAL) {
            continue;
        }
        CHECK(g_seen[i], "no test produced %s", dvl_status_string(i));
    }
    printf("test_api: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}
