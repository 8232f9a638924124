// dvl.hpp: a small header-only C++17 RAII wrapper over the dvl C ABI (include/dvl.h).
//
// Handles are move-only owners that free themselves; failures throw dvl::Error carrying the
// dvl_status and the library's message. The token callback is a std::function; an exception
// it throws cancels the generation and is rethrown from Context::generate (it never crosses
// the C boundary).
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dvl.h"

namespace dvl {

class Error : public std::runtime_error {
public:
    Error(dvl_status status, const std::string &what)
        : std::runtime_error(std::string(dvl_status_string(status)) + ": " + what),
          status_(status) {}
    dvl_status status() const noexcept { return status_; }

private:
    dvl_status status_;
};

inline void check(dvl_status st, const dvl_context *ctx = nullptr) {
    if (st != DVL_OK) {
        throw Error(st, dvl_last_error(ctx));
    }
}

inline dvl_generate_params default_generate_params() {
    dvl_generate_params p;
    check(dvl_generate_default_params(&p, sizeof p));
    return p;
}

class Model {
public:
    explicit Model(const std::string &dir) {
        dvl_model_params p;
        check(dvl_model_default_params(&p, sizeof p));
        check(dvl_model_load(dir.c_str(), &p, &m_));
    }
    ~Model() { dvl_model_free(&m_); }
    Model(Model &&o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
    Model &operator=(Model &&o) noexcept {
        if (this != &o) {
            dvl_model_free(&m_);
            m_ = std::exchange(o.m_, nullptr);
        }
        return *this;
    }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;

    const dvl_model *get() const noexcept { return m_; }

    std::string token_text(uint32_t token) const {
        std::size_t len = 0;
        dvl_status st = dvl_model_token_text(m_, token, nullptr, 0, &len);
        if (st != DVL_ERR_BUFFER_TOO_SMALL) {
            check(st);
        }
        std::string s(len + 1, '\0');
        check(dvl_model_token_text(m_, token, &s[0], s.size(), &len));
        s.resize(len);
        return s;
    }

private:
    dvl_model *m_ = nullptr;
};

class Prompt {
public:
    explicit Prompt(const std::string &text) { check(dvl_prompt_new(text.c_str(), &p_)); }
    ~Prompt() { dvl_prompt_free(&p_); }
    Prompt(Prompt &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
    Prompt &operator=(Prompt &&o) noexcept {
        if (this != &o) {
            dvl_prompt_free(&p_);
            p_ = std::exchange(o.p_, nullptr);
        }
        return *this;
    }
    Prompt(const Prompt &) = delete;
    Prompt &operator=(const Prompt &) = delete;

    Prompt &add_image_file(const std::string &path) {
        check(dvl_prompt_add_image_file(p_, path.c_str()));
        return *this;
    }
    Prompt &add_image_rgb8(const std::uint8_t *pixels, std::uint32_t width,
                           std::uint32_t height, std::size_t stride = 0) {
        check(dvl_prompt_add_image_rgb8(p_, pixels, width, height, stride));
        return *this;
    }
    const dvl_prompt *get() const noexcept { return p_; }

private:
    dvl_prompt *p_ = nullptr;
};

class Context {
public:
    /// Called for each committed position: (position, token id, text piece).
    using TokenFn = std::function<void(std::uint32_t, std::uint32_t, const char *)>;

    explicit Context(const Model &model, std::uint32_t n_threads = 0) {
        dvl_context_params p;
        check(dvl_context_default_params(&p, sizeof p));
        p.n_threads = n_threads;
        check(dvl_context_new(model.get(), &p, &c_));
    }
    ~Context() { dvl_context_free(&c_); }
    Context(Context &&o) noexcept : c_(std::exchange(o.c_, nullptr)) {}
    Context &operator=(Context &&o) noexcept {
        if (this != &o) {
            dvl_context_free(&c_);
            c_ = std::exchange(o.c_, nullptr);
        }
        return *this;
    }
    Context(const Context &) = delete;
    Context &operator=(const Context &) = delete;

    /// Generate; throws dvl::Error (status DVL_ERR_CANCELLED after cancel()).
    void generate(const Prompt &prompt, dvl_generate_params params, TokenFn on_token = {}) {
        Stream s{this, std::move(on_token), nullptr};
        if (s.fn) {
            params.on_token = &Context::trampoline;
            params.user_data = &s;
        }
        dvl_status st = dvl_generate(c_, prompt.get(), &params);
        if (s.error) {
            std::rethrow_exception(s.error);
        }
        check(st, c_);
    }

    /// Thread-safe: stops the running generation before its next denoising step.
    void cancel() noexcept { dvl_context_cancel(c_); }

    std::string text() const {
        std::size_t len = 0;
        dvl_status st = dvl_context_get_text(c_, nullptr, 0, &len);
        if (st != DVL_ERR_BUFFER_TOO_SMALL) {
            check(st, c_);
        }
        std::string s(len + 1, '\0');
        check(dvl_context_get_text(c_, &s[0], s.size(), &len), c_);
        s.resize(len);
        return s;
    }

    std::vector<std::uint32_t> ids() const {
        std::size_t n = 0;
        dvl_status st = dvl_context_get_ids(c_, nullptr, 0, &n);
        if (st != DVL_ERR_BUFFER_TOO_SMALL && st != DVL_OK) {
            check(st, c_);
        }
        std::vector<std::uint32_t> v(n);
        check(dvl_context_get_ids(c_, v.data(), v.size(), &n), c_);
        return v;
    }

    dvl_generation_stats stats() const {
        dvl_generation_stats s;
        check(dvl_context_get_stats(c_, &s, sizeof s), c_);
        return s;
    }

    dvl_context *get() const noexcept { return c_; }

private:
    struct Stream {
        Context *self;
        TokenFn fn;
        std::exception_ptr error;
    };

    static void trampoline(std::uint32_t pos, std::uint32_t token, const char *piece,
                           void *user_data) {
        auto *s = static_cast<Stream *>(user_data);
        if (s->error) {
            return;
        }
        try {
            s->fn(pos, token, piece);
        } catch (...) {
            // Exceptions must not unwind through C: stop, and rethrow from generate().
            s->error = std::current_exception();
            s->self->cancel();
        }
    }

    dvl_context *c_ = nullptr;
};

} // namespace dvl
