// describe (C++): the C example's request through the RAII wrapper in dvl.hpp.
//
//   describe_cpp [--gen-length N] [--threads N] MODEL_DIR IMAGE_PATH|- [PROMPT]
//
// Streams the answer to stdout in reading order and prints the generated window's ids on
// stderr as "ids: ID ID ...", equal to `dvl generate --json`'s "ids" for the same request.
//
// Build (see scripts/ffi-check.sh):
//   c++ -std=c++17 -Wall -Werror -Iinclude -Iexamples/cpp examples/cpp/describe.cpp
//       -Ltarget/release -ldvl -lpthread -ldl -o describe_cpp
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "dvl.hpp"

int main(int argc, char **argv) {
    std::vector<std::string> pos;
    std::uint32_t gen_length = 0, threads = 0;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if ((a == "--gen-length" || a == "--threads") && i + 1 < argc) {
            (a == "--threads" ? threads : gen_length) =
                static_cast<std::uint32_t>(std::strtoul(argv[++i], nullptr, 10));
        } else if (a.rfind("--", 0) == 0) {
            pos.clear();
            break;
        } else {
            pos.push_back(a);
        }
    }
    if (pos.size() < 2 || pos.size() > 3) {
        std::cerr << "usage: describe_cpp [--gen-length N] [--threads N] MODEL_DIR "
                     "IMAGE_PATH|- [PROMPT]\n";
        return 2;
    }
    try {
        dvl::Model model(pos[0]);
        dvl::Context ctx(model, threads);
        dvl::Prompt prompt(pos.size() > 2 ? pos[2] : "Describe this image.");
        if (pos[1] != "-") {
            prompt.add_image_file(pos[1]);
        }
        dvl_generate_params params = dvl::default_generate_params();
        if (gen_length != 0) {
            params.gen_length = gen_length;
        }
        // Reveal committed positions in reading order, up to the end of the answer.
        std::vector<std::uint32_t> window(params.gen_length, DVL_MASK_ID);
        std::vector<std::string> pieces(params.gen_length);
        std::size_t next = 0;
        bool ended = false;
        ctx.generate(prompt, params, [&](std::uint32_t p, std::uint32_t token, const char *piece) {
            window.at(p) = token;
            pieces.at(p) = piece;
            while (!ended && next < window.size() && window[next] != DVL_MASK_ID) {
                if (window[next] == DVL_EOS_ID) {
                    ended = true;
                    break;
                }
                std::cout << pieces[next++];
            }
            std::cout.flush();
        });
        std::cout << std::endl;
        if (ctx.ids() != window) {
            std::cerr << "describe_cpp: streamed tokens differ from the context's ids\n";
            return 1;
        }
        std::cerr << "ids:";
        for (std::uint32_t id : window) {
            std::cerr << ' ' << id;
        }
        std::cerr << '\n';
    } catch (const dvl::Error &e) {
        std::cerr << "describe_cpp: " << e.what() << '\n';
        return 1;
    }
    return 0;
}
