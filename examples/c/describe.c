/*
 * describe: answer a question about an image with libdvl, streaming the answer.
 *
 *   describe [options] MODEL_DIR IMAGE_PATH [PROMPT]
 *
 * IMAGE_PATH "-" asks PROMPT without an image. PROMPT defaults to "Describe this image.".
 * The answer is revealed on stdout in reading order as positions are committed (they are
 * committed out of order); the generated window's token ids are printed on stderr as one
 * line "ids: ID ID ...", the same ids as `dvl generate --json` prints for the same request.
 *
 * Options (the CLI's defaults otherwise):
 *   --gen-length N    answer window (default 128)
 *   --steps N         denoising steps per block (default 8)
 *   --threads N       worker threads (default: one per core)
 *   --cancel-after N  cancel the first generation from a second thread once N tokens are
 *                     committed, then generate again on the same context
 *
 * Build (see scripts/ffi-check.sh):
 *   cc -std=c99 -Wall -Wextra -Werror -Iinclude examples/c/describe.c
 *      -Ltarget/release -ldvl -lpthread -o describe
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dvl.h"

/* What the token callback sees: the window being revealed in order. */
typedef struct stream {
    uint32_t n;         /* window length (gen_length) */
    uint32_t *ids;      /* DVL_MASK_ID until committed */
    char **pieces;      /* text of each committed position */
    uint32_t next;      /* first position not yet printed */
    int ended;          /* EOS printed: stop revealing */
    uint32_t committed; /* tokens committed so far */
    /* --cancel-after: the callback hands over to the canceller thread at this count. */
    uint32_t cancel_after;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int cancel_requested; /* callback -> canceller */
    int cancel_done;      /* canceller -> callback */
    dvl_context *ctx;
} stream;

static void stream_reset(stream *s) {
    uint32_t i;
    for (i = 0; i < s->n; i++) {
        s->ids[i] = DVL_MASK_ID;
        free(s->pieces[i]);
        s->pieces[i] = NULL;
    }
    s->next = 0;
    s->ended = 0;
    s->committed = 0;
}

static void on_token(uint32_t position, uint32_t token, const char *piece, void *user_data) {
    stream *s = (stream *)user_data;
    size_t len;
    if (position >= s->n) {
        return;
    }
    s->ids[position] = token;
    len = strlen(piece);
    free(s->pieces[position]);
    s->pieces[position] = (char *)malloc(len + 1);
    if (s->pieces[position] != NULL) {
        memcpy(s->pieces[position], piece, len + 1);
    }
    /* Reveal the committed prefix, in reading order, up to the end of the answer. */
    while (!s->ended && s->next < s->n && s->ids[s->next] != DVL_MASK_ID) {
        if (s->ids[s->next] == DVL_EOS_ID) {
            s->ended = 1;
            break;
        }
        if (s->pieces[s->next] != NULL) {
            fputs(s->pieces[s->next], stdout);
        }
        s->next++;
    }
    fflush(stdout);
    s->committed++;
    if (s->cancel_after > 0 && s->committed == s->cancel_after) {
        /* Let the canceller thread cancel while this generation is provably running. */
        pthread_mutex_lock(&s->mu);
        s->cancel_requested = 1;
        pthread_cond_broadcast(&s->cv);
        while (!s->cancel_done) {
            pthread_cond_wait(&s->cv, &s->mu);
        }
        pthread_mutex_unlock(&s->mu);
    }
}

static void *canceller(void *arg) {
    stream *s = (stream *)arg;
    pthread_mutex_lock(&s->mu);
    while (!s->cancel_requested && !s->cancel_done) {
        pthread_cond_wait(&s->cv, &s->mu);
    }
    if (s->cancel_requested) {
        dvl_status st = dvl_context_cancel(s->ctx);
        if (st != DVL_OK) {
            fprintf(stderr, "describe: dvl_context_cancel: %s\n", dvl_status_string(st));
        }
    }
    s->cancel_done = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void on_log(dvl_log_level level, const char *message, void *user_data) {
    (void)user_data;
    fprintf(stderr, "dvl[%d]: %s\n", (int)level, message);
}

static int fail(const char *what, dvl_status st, const dvl_context *ctx) {
    fprintf(stderr, "describe: %s failed: %s: %s\n", what, dvl_status_string(st),
            dvl_last_error(ctx));
    return 1;
}

static int parse_u32(const char *s, uint32_t *out) {
    char *end = NULL;
    unsigned long v = strtoul(s, &end, 10);
    if (s[0] == '\0' || *end != '\0' || v > 0xFFFFFFFFul) {
        return 0;
    }
    *out = (uint32_t)v;
    return 1;
}

static void usage(void) {
    fprintf(stderr, "usage: describe [--gen-length N] [--steps N] [--threads N] "
                    "[--cancel-after N] MODEL_DIR IMAGE_PATH|- [PROMPT]\n");
}

int main(int argc, char **argv) {
    const char *pos[3] = {NULL, NULL, NULL};
    int n_pos = 0, i, rc = 1;
    uint32_t gen_length = 0, steps = 0, threads = 0, cancel_after = 0;
    dvl_model *model = NULL;
    dvl_context *ctx = NULL;
    dvl_prompt *prompt = NULL;
    dvl_model_params mp;
    dvl_context_params cp;
    dvl_generate_params gp;
    dvl_status st;
    stream s;
    uint32_t *got = NULL;
    size_t n_got = 0;

    for (i = 1; i < argc; i++) {
        uint32_t *target = NULL;
        if (strcmp(argv[i], "--gen-length") == 0) {
            target = &gen_length;
        } else if (strcmp(argv[i], "--steps") == 0) {
            target = &steps;
        } else if (strcmp(argv[i], "--threads") == 0) {
            target = &threads;
        } else if (strcmp(argv[i], "--cancel-after") == 0) {
            target = &cancel_after;
        } else if (argv[i][0] == '-' && argv[i][1] == '-') {
            usage();
            return 2;
        } else if (n_pos < 3) {
            pos[n_pos++] = argv[i];
            continue;
        } else {
            usage();
            return 2;
        }
        if (i + 1 >= argc || !parse_u32(argv[i + 1], target)) {
            usage();
            return 2;
        }
        i++;
    }
    if (n_pos < 2) {
        usage();
        return 2;
    }
    if (dvl_abi_version() != DVL_ABI_VERSION) {
        fprintf(stderr, "describe: libdvl ABI %u, header ABI %u\n", (unsigned)dvl_abi_version(),
                (unsigned)DVL_ABI_VERSION);
        return 1;
    }
    dvl_log_set(on_log, DVL_LOG_WARN, NULL);

    dvl_model_default_params(&mp, sizeof mp);
    st = dvl_model_load(pos[0], &mp, &model);
    if (st != DVL_OK) {
        return fail("dvl_model_load", st, NULL);
    }
    dvl_context_default_params(&cp, sizeof cp);
    cp.n_threads = threads;
    st = dvl_context_new(model, &cp, &ctx);
    if (st != DVL_OK) {
        rc = fail("dvl_context_new", st, NULL);
        goto out;
    }
    st = dvl_prompt_new(n_pos > 2 ? pos[2] : "Describe this image.", &prompt);
    if (st != DVL_OK) {
        rc = fail("dvl_prompt_new", st, NULL);
        goto out;
    }
    if (strcmp(pos[1], "-") != 0) {
        st = dvl_prompt_add_image_file(prompt, pos[1]);
        if (st != DVL_OK) {
            rc = fail("dvl_prompt_add_image_file", st, NULL);
            goto out;
        }
    }

    dvl_generate_default_params(&gp, sizeof gp);
    if (gen_length) {
        gp.gen_length = gen_length;
    }
    if (steps) {
        gp.steps = steps;
    }
    memset(&s, 0, sizeof s);
    s.n = gp.gen_length;
    s.ids = (uint32_t *)malloc(s.n * sizeof *s.ids);
    s.pieces = (char **)calloc(s.n, sizeof *s.pieces);
    got = (uint32_t *)malloc(s.n * sizeof *got);
    if (s.ids == NULL || s.pieces == NULL || got == NULL) {
        fprintf(stderr, "describe: out of memory\n");
        goto out_stream;
    }
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    s.ctx = ctx;
    gp.on_token = on_token;
    gp.user_data = &s;

    if (cancel_after > 0) {
        pthread_t th;
        stream_reset(&s);
        s.cancel_after = cancel_after;
        if (pthread_create(&th, NULL, canceller, &s) != 0) {
            fprintf(stderr, "describe: cannot start the canceller thread\n");
            goto out_sync;
        }
        st = dvl_generate(ctx, prompt, &gp);
        /* Release the canceller if the generation ended before the N-th token. */
        pthread_mutex_lock(&s.mu);
        s.cancel_done = 1;
        pthread_cond_broadcast(&s.cv);
        pthread_mutex_unlock(&s.mu);
        pthread_join(th, NULL);
        printf("\n");
        if (st == DVL_ERR_CANCELLED) {
            fprintf(stderr, "describe: cancelled after %u committed tokens; generating again\n",
                    (unsigned)s.committed);
        } else if (st == DVL_OK) {
            fprintf(stderr, "describe: finished before %u tokens (%u committed); generating again\n",
                    (unsigned)cancel_after, (unsigned)s.committed);
        } else {
            rc = fail("dvl_generate (to be cancelled)", st, ctx);
            goto out_sync;
        }
        s.cancel_after = 0;
    }

    stream_reset(&s);
    st = dvl_generate(ctx, prompt, &gp);
    if (st != DVL_OK) {
        rc = fail("dvl_generate", st, ctx);
        goto out_sync;
    }
    printf("\n");
    fflush(stdout);

    /* The streamed window must be the library's result exactly. */
    st = dvl_context_get_ids(ctx, got, s.n, &n_got);
    if (st != DVL_OK) {
        rc = fail("dvl_context_get_ids", st, ctx);
        goto out_sync;
    }
    if (n_got != s.n || memcmp(got, s.ids, s.n * sizeof *got) != 0) {
        fprintf(stderr, "describe: streamed tokens differ from dvl_context_get_ids\n");
        goto out_sync;
    }
    fprintf(stderr, "ids:");
    for (i = 0; i < (int)s.n; i++) {
        fprintf(stderr, " %u", (unsigned)s.ids[i]);
    }
    fprintf(stderr, "\n");
    rc = 0;

out_sync:
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
out_stream:
    if (s.pieces != NULL && s.ids != NULL) {
        stream_reset(&s);
    }
    free(s.pieces);
    free(s.ids);
    free(got);
out:
    dvl_prompt_free(&prompt);
    dvl_context_free(&ctx);
    dvl_model_free(&model);
    return rc;
}
