// Unit tests of the LibTorch-free parts of ctm_sample: JSON reader, meta.json validation,
// command line, rho grid, NPY header, CRC-32, PNG grid, atomic files. Run by ctest and by
// tests/test_cpp_sampler.py; prints failures and exits non-zero when any check fails.
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "errors.hpp"
#include "integrity.hpp"
#include "json.hpp"
#include "meta.hpp"
#include "options.hpp"
#include "output.hpp"
#include "sample_files.hpp"
#include "sha256.hpp"

namespace {

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what, int line) {
    ++g_checks;
    if (!ok) {
        ++g_failures;
        std::cerr << "FAIL line " << line << ": " << what << "\n";
    }
}
#define CHECK(cond) check((cond), #cond, __LINE__)

// Runs f, expects an exception of type E whose message contains `needle`.
template <typename E>
void expect_throw(const std::function<void()>& f, const std::string& needle, int line) {
    ++g_checks;
    try {
        f();
    } catch (const E& e) {
        if (std::string(e.what()).find(needle) == std::string::npos) {
            ++g_failures;
            std::cerr << "FAIL line " << line << ": message '" << e.what() << "' lacks '"
                      << needle << "'\n";
        }
        return;
    } catch (const std::exception& e) {
        ++g_failures;
        std::cerr << "FAIL line " << line << ": wrong exception type: " << e.what() << "\n";
        return;
    }
    ++g_failures;
    std::cerr << "FAIL line " << line << ": no exception (expected '" << needle << "')\n";
}
#define EXPECT_THROW(E, expr, needle) expect_throw<E>([&] { (void)(expr); }, needle, __LINE__)

using ctm::Json;
using ctm::JsonError;
using ctm::UserError;

void test_json() {
    Json v = ctm::parse_json(
        R"( {"a": 1, "b": -2.5e3, "c": "x\"y\\z\u00e9\ud83d\ude00", "d": [1, 2, [3]],
             "e": {"f": null}, "g": true, "h": false, "a": 7, "i": 0.002, "j": 1e400} )");
    CHECK(v.is_object());
    CHECK(v.find("a")->as_int() == 7);   // repeated key: the last one wins
    CHECK(v.find("b")->number == -2500.0 && !v.find("b")->integral);
    CHECK(!v.find("b")->as_int());
    CHECK(v.find("c")->text == "x\"y\\z\xC3\xA9\xF0\x9F\x98\x80");
    CHECK(v.find("d")->items.size() == 3 && v.find("d")->items[2].items[0].as_int() == 3);
    CHECK(v.find("e")->find("f")->is_null());
    CHECK(v.find("g")->boolean && !v.find("h")->boolean);
    CHECK(v.find("i")->number == 0.002);
    CHECK(std::isinf(v.find("j")->number));
    CHECK(v.find("zz") == nullptr);
    CHECK(ctm::parse_json("[]").items.empty() && ctm::parse_json("{}").members.empty());
    CHECK(std::isnan(ctm::parse_json("NaN").number));
    CHECK(ctm::parse_json("-Infinity").number < 0 && ctm::parse_json("Infinity").number > 0);
    CHECK(ctm::parse_json("-0").as_int() == 0);
    CHECK(!ctm::parse_json("99999999999999999999").as_int());   // beyond int64
    CHECK(ctm::parse_json("17.52783196464411").number == 17.52783196464411);
    for (const char* bad : {"", "{", "{\"a\" 1}", "{\"a\": 1,}", "[1 2]", "[1,]", "\"abc",
                            "tru", "01", "1.", "-", ".5", "1e", "{\"a\": 1} x", "{a: 1}",
                            "\"\\x\"", "\"\\u12g4\"", "\"a\nb\"", "+1"})
        EXPECT_THROW(JsonError, ctm::parse_json(bad), "at byte");
    std::string deep(100, '[');
    EXPECT_THROW(JsonError, ctm::parse_json(deep), "nesting too deep");
}

std::string meta_json(const std::string& replace_key = "", const std::string& with = "") {
    std::vector<std::pair<std::string, std::string>> kv = {
        {"format", "\"ctmkit.jumper\""}, {"version", "1"}, {"precond", "\"ctm\""},
        {"variant", "null"}, {"sigma_data", "0.5"}, {"t_min", "0.002"}, {"t_max", "80.0"},
        {"rho", "7.0"}, {"shape", "[3, 8, 8]"}, {"num_classes", "0"}, {"dtype", "\"float32\""},
        {"ctmkit_version", "\"0.1.0\""}};
    std::string s = "{";
    for (auto& [k, v] : kv) {
        if (k == replace_key && with.empty()) continue;   // drop the key
        s += (s.size() > 1 ? ", \"" : "\"") + k + "\": " + (k == replace_key ? with : v);
    }
    return s + ", \"student_init\": \"teacher\", \"extra\": {\"nested\": [1, 2]}}";
}

void test_meta() {
    ctm::JumperMeta m = ctm::parse_meta(meta_json(), "m.pt");
    CHECK(m.precond == "ctm" && m.variant.empty() && m.dtype == "float32");
    CHECK(m.sigma_data == 0.5 && m.t_min == 0.002 && m.t_max == 80.0 && m.rho == 7.0);
    CHECK((m.shape == std::vector<std::int64_t>{3, 8, 8}) && m.sample_numel() == 192);
    CHECK(m.is_image() && m.num_classes == 0);
    CHECK(ctm::parse_meta(meta_json("variant", "\"forward\""), "m").variant == "forward");
    CHECK(ctm::parse_meta(meta_json("version", "1.0"), "m").t_max == 80.0);
    CHECK(!ctm::parse_meta(meta_json("shape", "[2]"), "m").is_image());
    CHECK(!ctm::parse_meta(meta_json("shape", "[2, 8, 8]"), "m").is_image());
    CHECK(ctm::parse_meta(meta_json("num_classes", "10"), "m").num_classes == 10);

    EXPECT_THROW(UserError, ctm::parse_meta("{\"format\": ", "m.pt"),
                 "m.pt: meta.json is not valid JSON");
    EXPECT_THROW(UserError, ctm::parse_meta("[1]", "m.pt"), "not a JSON object");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("format", "\"other\""), "m.pt"),
                 "m.pt: not a ctmkit jumper (meta.json format is 'other')");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("format"), "m.pt"), "format is missing");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("rho"), "m.pt"), "meta.json lacks rho");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("version", "2"), "m.pt"),
                 "jumper format version 2 is not supported");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("t_min", "80.0"), "m"), "t_min < t_max");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("t_min", "0"), "m"), "t_min < t_max");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("t_min", "\"0.1\""), "m"),
                 "t_min is a string, not a number");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("t_max", "Infinity"), "m"), "not finite");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("rho", "0"), "m"), "rho > 0");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("sigma_data", "-1"), "m"),
                 "sigma_data > 0");
    for (const char* bad : {"[]", "[0]", "[2, -1]", "[2.0]", "[\"2\"]", "2", "null"})
        EXPECT_THROW(UserError, ctm::parse_meta(meta_json("shape", bad), "m"),
                     "shape must be a non-empty list of positive integers");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("shape", "[1048576, 1048576, 2]"), "m"),
                 "shape is too large");
    for (const char* bad : {"-1", "1.5", "\"3\"", "null"})
        EXPECT_THROW(UserError, ctm::parse_meta(meta_json("num_classes", bad), "m"),
                     "num_classes must be an integer in 0..");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("dtype", "\"float16\""), "m"),
                 "neither float32 nor float64");
    EXPECT_THROW(UserError, ctm::parse_meta(meta_json("precond", "3"), "m"),
                 "precond is a number, not a string");
}

ctm::Options parse(std::vector<std::string> args) {
    std::vector<const char*> argv{"ctm_sample"};
    for (auto& a : args) argv.push_back(a.c_str());
    return ctm::parse_options(static_cast<int>(argv.size()), argv.data());
}

void test_options() {
    ctm::Options o = parse({"--model", "j.pt", "--out", "s.npy"});
    CHECK(o.steps == 2 && o.num == 1000 && o.batch == 500 && o.seed == 0 && o.gamma == 0.0);
    CHECK(o.device == "cpu" && !o.timesteps && !o.class_label && !o.timing && !o.help);
    CHECK(o.warmup == 2);
    CHECK(parse({"--model", "j.pt2", "--out", "s.npy", "--warmup", "0"}).warmup == 0);
    CHECK(parse({"--model", "j", "--out", "o", "--warmup=5"}).warmup == 5);
    o = parse({"--model=j.pt", "--out", "s.npy", "--steps", "3", "--num=10", "--batch", "4",
               "--seed", "18446744073709551615", "--gamma", "0.5", "--class-label", "2",
               "--device", "cuda:1", "--threads", "3", "--timing", "--quiet"});
    CHECK(o.model == "j.pt" && o.steps == 3 && o.num == 10 && o.batch == 4);
    CHECK(o.seed == 18446744073709551615ull && o.gamma == 0.5 && o.class_label == 2);
    CHECK(o.device == "cuda:1" && o.threads == 3 && o.timing && o.quiet);
    o = parse({"--model", "j", "--out", "o", "--timesteps", "80,1.5,0.002"});
    CHECK(o.timesteps && (*o.timesteps == std::vector<double>{80, 1.5, 0.002}));
    CHECK(parse({"--model", "j", "--out", "o", "--steps", "2", "--timesteps", "3,2,1"}).steps == 2);
    CHECK(parse({"--bogus", "--help"}).help);

    std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
        {{"--model", "j"}, "--out is required"},
        {{"--out", "o"}, "--model is required"},
        {{"--model", "j", "--out", "o", "--frobnicate", "1"}, "unknown flag '--frobnicate'"},
        {{"--model", "j", "--out", "o", "extra"}, "unexpected argument 'extra'"},
        {{"--model", "j", "--out"}, "--out needs a value"},
        {{"--model", "j", "--out", "o", "--model", "k"}, "--model given twice"},
        {{"--model", "j", "--out", "o", "--steps", "0"}, "--steps: expected an integer >= 1"},
        {{"--model", "j", "--out", "o", "--steps", "two"}, "got 'two'"},
        {{"--model", "j", "--out", "o", "--steps", "2.5"}, "--steps"},
        {{"--model", "j", "--out", "o", "--num", "-3"}, "--num: expected an integer >= 1"},
        {{"--model", "j", "--out", "o", "--batch", ""}, "--batch"},
        {{"--model", "j", "--out", "o", "--seed", "-1"}, "--seed"},
        {{"--model", "j", "--out", "o", "--seed", "18446744073709551616"}, "--seed"},
        {{"--model", "j", "--out", "o", "--gamma", "1.5"}, "--gamma: expected a number in [0, 1]"},
        {{"--model", "j", "--out", "o", "--gamma", "nan"}, "--gamma"},
        {{"--model", "j", "--out", "o", "--gamma", "x"}, "--gamma"},
        {{"--model", "j", "--out", "o", "--class-label", "-1"}, "--class-label"},
        {{"--model", "j", "--out", "o", "--device", "tpu"}, "--device: expected cpu, cuda"},
        {{"--model", "j", "--out", "o", "--timesteps", "80"}, "at least two times"},
        {{"--model", "j", "--out", "o", "--timesteps", "1,2"}, "strictly decreasing"},
        {{"--model", "j", "--out", "o", "--timesteps", "2,2"}, "strictly decreasing"},
        {{"--model", "j", "--out", "o", "--timesteps", "2,-1"}, "positive times"},
        {{"--model", "j", "--out", "o", "--timesteps", "2,a"}, "--timesteps"},
        {{"--model", "j", "--out", "o", "--timesteps", "2,1,"}, "--timesteps"},
        {{"--model", "j", "--out", "o", "--steps", "3", "--timesteps", "2,1"},
         "--steps 3 disagrees with --timesteps (1 jumps)"},
        {{"--model", "j", "--out", "o", "--timing=1"}, "--timing takes no value"},
        {{"--model", "j", "--out", "o", "--warmup", "-1"}, "--warmup: expected an integer >= 0"},
        {{"--model", "j", "--out", "o", "--warmup", "x"}, "--warmup"},
    };
    for (auto& [args, needle] : bad) EXPECT_THROW(UserError, parse(args), needle);
}

void test_grid_and_meta_checks() {
    // Values from core/diffusion/schedules.py: rho_grid (Python floats, repr).
    auto g = ctm::rho_grid(4, 0.002, 80.0, 7.0);
    CHECK((g == std::vector<double>{80.0, 17.52783196464411, 2.515218976147159,
                                    0.16975275626876413, 0.002}));
    g = ctm::rho_grid(3, 0.01, 10.0, 3.5);
    CHECK((g == std::vector<double>{10.0, 3.060395132375415, 0.504444721680992, 0.01}));
    CHECK((ctm::rho_grid(1, 0.002, 80.0, 7.0) == std::vector<double>{80.0, 0.002}));

    ctm::JumperMeta m = ctm::parse_meta(meta_json("num_classes", "3"), "m");
    auto o = parse({"--model", "j", "--out", "o", "--steps", "4"});
    CHECK(ctm::resolve_timesteps(o, m).size() == 5);
    o = parse({"--model", "j", "--out", "o", "--timesteps", "80,0.002"});
    CHECK(ctm::resolve_timesteps(o, m).size() == 2);
    o = parse({"--model", "j", "--out", "o", "--timesteps", "81,1"});
    EXPECT_THROW(UserError, ctm::resolve_timesteps(o, m), "must lie in the model's");
    o = parse({"--model", "j", "--out", "o", "--timesteps", "80,0.001"});
    EXPECT_THROW(UserError, ctm::resolve_timesteps(o, m), "must lie in the model's");
    o = parse({"--model", "j", "--out", "o", "--class-label", "2"});
    ctm::check_against_meta(o, m);
    o = parse({"--model", "j", "--out", "o", "--class-label", "3"});
    EXPECT_THROW(UserError, ctm::check_against_meta(o, m), "expected 0 <= C < 3, got 3");
    EXPECT_THROW(UserError, ctm::check_against_meta(o, ctm::parse_meta(meta_json(), "m")),
                 "unconditional");
    // values per batch: 3 x 512 x 512 = 786432 values per sample, 341 samples in 2^28
    ctm::JumperMeta big = ctm::parse_meta(meta_json("shape", "[3, 512, 512]"), "m");
    o = parse({"--model", "j", "--out", "o", "--batch", "341"});
    ctm::check_against_meta(o, big);
    o = parse({"--model", "j", "--out", "o", "--batch", "342"});
    EXPECT_THROW(UserError, ctm::check_against_meta(o, big),
                 "--batch: at most 268435456 values per batch (341 samples of this model), "
                 "got 342");
    o = parse({"--model", "j", "--out", "o", "--batch", "342", "--num", "341"});
    ctm::check_against_meta(o, big);   // the batch is min(--batch, --num)
    // flag bounds
    EXPECT_THROW(UserError, parse({"--model", "j", "--out", "o", "--steps", "10001"}),
                 "--steps: at most 10000, got '10001'");
    CHECK(parse({"--model", "j", "--out", "o", "--steps", "10000"}).steps == 10000);
    EXPECT_THROW(UserError, parse({"--model", "j", "--out", "o", "--threads", "1025"}),
                 "--threads: at most 1024");
    EXPECT_THROW(UserError, parse({"--model", "j", "--out", "o", "--warmup", "101"}),
                 "--warmup: at most 100");
    EXPECT_THROW(UserError, parse({"--model", "j", "--out", "o", "--batch", "1048577"}),
                 "--batch: at most 1048576");
}

void test_output() {
    CHECK(ctm::npy_header("<f4", {3, 2}) ==
          std::string("\x93NUMPY\x01\x00v\x00", 10) +
              "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }" +
              std::string(58, ' ') + "\n");
    CHECK(ctm::npy_header("<i8", {5}).find("'shape': (5,), }") != std::string::npos);
    for (auto shape : std::vector<std::vector<std::int64_t>>{{1}, {7, 1, 28, 28}, {123456789, 3}})
        CHECK(ctm::npy_header("<f4", shape).size() % 64 == 0);

    const std::string digits = "123456789";
    CHECK(ctm::crc32(reinterpret_cast<const std::uint8_t*>(digits.data()), digits.size()) ==
          0xCBF43926u);
    auto z = ctm::zlib_stream(std::vector<std::uint8_t>(100000, 7));
    CHECK(z.size() > 6 && z[0] == 0x78 && ((z[0] << 8) | z[1]) % 31 == 0);

    std::vector<float> imgs(5 * 1 * 2 * 3);
    for (std::size_t i = 0; i < imgs.size(); ++i) imgs[i] = -1.0f + 2.0f * float(i % 6) / 5.0f;
    imgs[0] = -7.0f;   // clamps to 0
    imgs[1] = 0.0f;    // round(127.5) = 128
    imgs[5] = 3.0f;    // clamps to 255
    ctm::Image grid = ctm::image_grid(imgs.data(), 5, 1, 2, 3, 64, 1);
    CHECK(grid.width == 3 * 4 + 1 && grid.height == 2 * 3 + 1 && grid.channels == 1);
    CHECK(grid.pixels[std::size_t(1) * grid.width + 1] == 0);
    CHECK(grid.pixels[std::size_t(1) * grid.width + 2] == 128);
    CHECK(grid.pixels[std::size_t(2) * grid.width + 3] == 255);
    CHECK(grid.pixels[0] == 0);   // padding
    ctm::Image rgb = ctm::image_grid(imgs.data(), 10, 3, 1, 1, 64, 2);   // 10 images of 3x1x1
    CHECK(rgb.width == 4 * 3 + 2 && rgb.height == 3 * 3 + 2);
    auto png = ctm::encode_png(grid.pixels, grid.width, grid.height, 1);
    CHECK(png.size() > 57 && png[0] == 0x89 && png[1] == 'P' && png[12] == 'I' &&
          png[15] == 'R');
    CHECK(std::string(png.end() - 8, png.end() - 4) == "IEND");
    EXPECT_THROW(std::invalid_argument, ctm::encode_png({1, 2}, 1, 1, 1), "bad image");

    CHECK(ctm::sibling_path("out/samples.npy", ".png") == "out/samples.png");
    CHECK(ctm::sibling_path("samples.npy", ".labels.npy") == "samples.labels.npy");
    CHECK(ctm::sibling_path("dir.npy/x", ".png") == "dir.npy/x.png");

    namespace fs = std::filesystem;
    fs::path dir = fs::temp_directory_path() / ("ctm_unit_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    std::string target = (dir / "a.npy").string();
    {
        ctm::AtomicFile f(target);
        f.write("abc", 3);
        CHECK(!fs::exists(target));
    }
    CHECK(!fs::exists(target) && fs::is_empty(dir));   // no commit: nothing left behind
    {
        ctm::AtomicFile f(target);
        f.write("abc", 3);
        f.commit();
    }
    std::ifstream in(target);
    std::string content((std::istreambuf_iterator<char>(in)), {});
    CHECK(content == "abc");
    CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);
    ctm::check_output_path(target);
    EXPECT_THROW(UserError, ctm::check_output_path((dir / "nope" / "x.npy").string()),
                 "does not exist");
    EXPECT_THROW(UserError, ctm::check_output_path(dir.string()), "is a directory");
    EXPECT_THROW(UserError, ctm::AtomicFile((dir / "nope" / "x.npy").string()),
                 "cannot create a file there");
    EXPECT_THROW(UserError, ctm::check_output_path("/dev/null"), "is a character device");
    fs::create_symlink(target, dir / "link.npy");
    EXPECT_THROW(UserError, ctm::check_output_path((dir / "link.npy").string()),
                 "is a symbolic link");
    EXPECT_THROW(UserError, ctm::check_not_input((dir / "link.npy").string(), target),
                 "is the model file");
    EXPECT_THROW(UserError, ctm::check_not_input(target + ".sha256", target),
                 "is the model's digest file");
    ctm::check_not_input((dir / "other.npy").string(), target);
    fs::remove_all(dir);
}

void test_sidecar() {   // core/base/integrity.py: write_sidecar / check_sidecar
    namespace fs = std::filesystem;
    fs::path dir = fs::temp_directory_path() / ("ctm_sidecar_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const std::string pkg = (dir / "j.pt2").string();
    EXPECT_THROW(UserError, ctm::check_sidecar(pkg, "abc"),
                 "no digest file j.pt2.sha256 beside it");
    auto write = [&](const std::string& text) { std::ofstream(pkg + ".sha256") << text; };
    write("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  j.pt2\n");
    ctm::check_sidecar(pkg, "abc");
    EXPECT_THROW(UserError, ctm::check_sidecar(pkg, "abd"),
                 "jumper is corrupt or altered (its SHA-256 does not match j.pt2.sha256)");
    write("BA7816BF  j.pt2\n");
    EXPECT_THROW(UserError, ctm::check_sidecar(pkg, "abc"), "not a SHA-256 digest file");
    write(std::string(5000, 'a'));
    EXPECT_THROW(UserError, ctm::check_sidecar(pkg, "abc"), "not a SHA-256 digest file");
    fs::remove(pkg + ".sha256");
    CHECK(::mkfifo((pkg + ".sha256").c_str(), 0600) == 0);   // would block an open
    EXPECT_THROW(UserError, ctm::check_sidecar(pkg, "abc"), "not a regular file");
    fs::remove_all(dir);
}

void test_sha256() {   // FIPS 180-4 examples, and a message longer than one block
    CHECK(ctm::Sha256().hex() ==
          "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    ctm::Sha256 abc;
    abc.update(std::string_view("abc"));
    CHECK(abc.hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    ctm::Sha256 two;
    two.update(std::string_view("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"));
    CHECK(two.hex() == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    ctm::Sha256 million;
    std::string a(1000, 'a');
    for (int i = 0; i < 1000; ++i) million.update(std::string_view(a));
    CHECK(million.hex() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

}  // namespace

void test_sample_files() {
    // core/export/sample_files.py's conversions, in float32, truncating
    CHECK(ctm::adm_uint8(-1.0f) == 0 && ctm::adm_uint8(1.0f) == 255 && ctm::adm_uint8(0.0f) == 127);
    CHECK(ctm::adm_uint8(-7.0f) == 0 && ctm::adm_uint8(3.0f) == 255);
    CHECK(ctm::edm_uint8(0.0f) == 128 && ctm::edm_uint8(1.0f) == 255 && ctm::edm_uint8(-1.0f) == 0);
    CHECK(ctm::edm_uint8(-0.9999f) == 0 && ctm::edm_uint8(0.99f) == 254);
    CHECK(ctm::png_relpath(0) == "000000/000000.png");
    CHECK(ctm::png_relpath(999) == "000000/000999.png");
    CHECK(ctm::png_relpath(1000) == "001000/001000.png");
    CHECK(ctm::png_relpath(123456) == "123000/123456.png");
    const float chw[2 * 1 * 2] = {-1.0f, 1.0f, 0.0f, 0.5f};   // C = 2, H = 1, W = 2
    CHECK((ctm::hwc_pixels(chw, 2, 1, 2, ctm::adm_uint8) ==
           std::vector<std::uint8_t>{0, 127, 255, 191}));
}

// The npz written by `NpzWriter` (ZIP64 records forced with `zip64`): 5 samples [3, 2, 4]
// with value (n * 24 + k) / 60 - 1 at flat index k of sample n, labels n % 3; read back with
// numpy by tests/test_cpp_sampler.py (ctm_runtime_tests --write-npz DIR).
void write_npz(const std::string& path, bool zip64) {
    ctm::NpzWriter npz(path, 5, 3, 2, 4, true, zip64);
    std::vector<std::int64_t> labels;
    for (int n = 0; n < 5; ++n) {
        std::vector<float> x(24);
        for (int k = 0; k < 24; ++k) x[k] = float(n * 24 + k) / 60.0f - 1.0f;
        npz.add(x.data());
        labels.push_back(n % 3);
    }
    npz.commit(labels);
}

int main(int argc, char** argv) {
    if (argc == 3 && std::string(argv[1]) == "--write-npz") {
        write_npz(std::string(argv[2]) + "/plain.npz", false);
        write_npz(std::string(argv[2]) + "/zip64.npz", true);
        return 0;
    }
    test_sample_files();
    test_sha256();
    test_json();
    test_meta();
    test_options();
    test_grid_and_meta_checks();
    test_output();
    test_sidecar();
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
