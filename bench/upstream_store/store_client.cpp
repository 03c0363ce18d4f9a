// Drives the config store of memfabric-hybrid 1.3.0 (the upstream C++ library, libmf_smem.so)
// for `python -m memfabric_hybrid.bench store`: its column "upstream 1.3.0".
//
// Upstream has no store client in its C API or its Python module; its own processes reach the
// store through the C++ class behind StoreFactory::CreateStore, which libmf_smem.so exports as
// C++ symbols. This program declares just the calls it makes and is linked against that library
// (memfabric_hybrid/bench/_upstream_store.py builds it with the flags below):
//
//   c++ -O2 -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=0 store_client.cpp -o store_client
//     -L<lib> -lmf_smem -lmf_hybm_core -Wl,--disable-new-dtags,-rpath,<lib>
//
// (an RPATH rather than a RUNPATH: libmf_smem.so carries no search path of its own, and only an
// RPATH of the program also serves its dependency libmf_hybm_core.so in the same directory).
//
// Modes (the lines meant for the caller start with "mfbench " and are the only ones on stdout;
// the library logs to stdout, so its output is moved to stderr):
//
//   store_client serve IP PORT   a store server (smem_create_config_store), until stdin closes
//   store_client check IP PORT SEED MAXSIZE
//                                round trips of random keys and values of many sizes, add with a
//                                running sum, compare_set that must succeed and must fail
//   store_client run IP PORT OP SIZE SECONDS IDX LATFILE
//                                connect, warm up, print "mfbench ready", wait for a line on
//                                stdin, run OP for SECONDS, write each op's latency (int64 ns,
//                                native order) to LATFILE, print "mfbench result ops=N wall_ns=W",
//                                exit when stdin closes
//
// Any failed check prints "mfbench error: ..." and exits non-zero: figures measured through a
// client that is called wrongly would be worthless.

#include <algorithm>
#include <cstdarg>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <iostream>
#include <random>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <unistd.h>
#include <vector>

// ---- the upstream ABI, as far as this program uses it --------------------------------------
//
// libmf_smem.so 1.3.0 was built with the pre-C++11 libstdc++ string: its symbols spell
// `std::string const&` as `RKSs` (nm -D shows no `__cxx11` in any of them), so this file must be
// compiled with -D_GLIBCXX_USE_CXX11_ABI=0. The declarations are real C++ member and static
// functions rather than asm-labelled C functions so that the linker checks every parameter type:
// built with the other string ABI, the mangled names no longer match and linking fails instead
// of passing a std::string of the wrong layout.
static_assert(sizeof(std::string) == sizeof(void *),
              "build with -D_GLIBCXX_USE_CXX11_ABI=0: libmf_smem.so takes the reference-counted std::string");

namespace ock {
namespace smem {

// The object a StoreFactory hands out. Only ever seen through a pointer here: its layout (vptr
// first, as for any polymorphic class) is read through the Itanium C++ ABI, see TcpStore() below.
class ConfigStore;

// Upstream's intrusive smart pointer: exactly one pointer to the object, whose reference count
// lives inside the object. Its copy constructor and destructor are user-provided there, which
// makes it non-trivial for the purposes of calls: a function returning one by value receives a
// hidden pointer to the caller's slot (in %rdi) and the declared arguments move one register to
// the right. Declaring the same shape here (non-trivial destructor, one pointer) makes this
// compiler use that same convention for CreateStore's result.
template <typename T>
class SmRef {
public:
    SmRef() noexcept = default;
    SmRef(const SmRef &) = delete;
    SmRef &operator=(const SmRef &) = delete;
    // Keeps the reference it was given: the store stays alive until the process exits (the
    // factory holds one too), so nothing here needs upstream's reference counting.
    ~SmRef() {}
    T *get() const noexcept { return obj_; }

private:
    T *obj_ = nullptr;
};
static_assert(sizeof(SmRef<ConfigStore>) == sizeof(void *), "SmRef is one pointer");
static_assert(!std::is_trivially_destructible<SmRef<ConfigStore>>::value,
              "SmRef must be returned through a hidden pointer, as upstream's is");

class StoreFactory {
public:
    // model: 0 starts a client only (1 a server only, 2 both); worldSize UINT32_MAX and rankId -1
    // are the defaults for a client that does not belong to a ranked group; connMaxRetry bounds
    // the connection attempts. Returns an empty SmRef on failure.
    static SmRef<ConfigStore> CreateStore(const std::string &ip, uint16_t port, uint16_t model, uint32_t worldSize,
                                          int32_t rankId, int32_t connMaxRetry) noexcept;
};

// The class CreateStore instantiates for tcp:// stores. Its operations are called as ordinary
// (non-virtual) member functions on the complete object: each is exported under its own name,
// and a direct call needs `this` to point at the TcpConfigStore itself, which TcpStore() finds.
// Return values are int32_t: 0 on success, otherwise an error code (the library loads them into
// %eax as 32-bit values, e.g. -405 from Cas). GetReal is protected upstream; access does not take
// part in the mangled name, so it is declared public here.
class TcpConfigStore {
public:
    int32_t Set(const std::string &key, const std::vector<uint8_t> &value) noexcept;
    int32_t GetReal(const std::string &key, std::vector<uint8_t> &value, int64_t timeoutMs) noexcept;
    int32_t Add(const std::string &key, int64_t increment, int64_t &value) noexcept;
    // 0: swapped; -405: not swapped; anything else: the request failed. Either way `exists` is
    // the value the key holds afterwards (after a swap: `value`), see Check().
    int32_t Cas(const std::string &key, const std::vector<uint8_t> &expect, const std::vector<uint8_t> &value,
                std::vector<uint8_t> &exists) noexcept;
};

// Parses a store URL. It must run before a client connects: parsing registers the address
// family for the URL's port, which the connection code looks up by port (without it the connect
// fails at once with "Assert parser != nullptr"); upstream's own clients do the same. Its object
// is a std::string (the host) followed by a uint16_t (the port, 9980 until parsed), as
// smem_create_config_store builds it on its stack before the call; `spare` leaves room in case
// there is more after them.
class UrlExtraction {
public:
    int32_t ExtractIpPortFromUrl(const std::string &url);

    std::string ip;
    uint16_t port = 9980;
    char spare[64] = {};
};

}  // namespace smem
}  // namespace ock

extern "C" {
// From upstream's public C header smem.h: starts a store server for a tcp:// URL in this process
// (a server and a client in it, like the stores its applications create), and the log level
// (0 debug, 1 info, 2 warn, 3 error).
int32_t smem_create_config_store(const char *storeUrl, uint64_t flags);
int32_t smem_set_log_level(int level);
}

namespace {

constexpr int32_t kCasFailed = -405;  // what TcpConfigStore::Cas returns when the value differs
constexpr uint16_t kModelClient = 0;

// The caller's channel: the process's original stdout (main() points fd 1 at stderr).
int g_outFd = 1;
FILE *g_out = stdout;

__attribute__((format(printf, 1, 2))) void Say(const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    std::vfprintf(g_out, fmt, args);
    va_end(args);
    std::fflush(g_out);
}

[[noreturn]] void Fail(const std::string &what)
{
    Say("mfbench error: %s\n", what.c_str());
    _exit(2);
}

void Expect(bool ok, const std::string &what)
{
    if (!ok) {
        Fail(what);
    }
}

// A hung request must not hang the benchmark: upstream's own wait for a reply is 600 s.
extern "C" void OnAlarm(int)
{
    static const char msg[] = "mfbench error: deadline passed, the store did not answer\n";
    ssize_t ignored = write(g_outFd, msg, sizeof msg - 1);
    (void)ignored;
    _exit(3);
}

void Deadline(unsigned seconds)
{
    std::signal(SIGALRM, OnAlarm);
    alarm(seconds);
}

// CreateStore returns a pointer to the ConfigStore part of the object it made. Under the Itanium
// C++ ABI every polymorphic (sub)object starts with a vtable pointer; the two words before the
// address it points at are the offset from this subobject to the complete object and the
// complete object's std::type_info. Both are checked here rather than assumed: the dynamic type
// must be ock::smem::TcpConfigStore, and `this` for its member functions is the complete object.
intptr_t g_offsetToTop = 0;  // reported by `check`

ock::smem::TcpConfigStore *TcpStore(ock::smem::ConfigStore *base)
{
    Expect(base != nullptr, "CreateStore returned no store");
    auto vptr = *reinterpret_cast<const intptr_t *const *>(base);
    const intptr_t offsetToTop = vptr[-2];
    const auto *type = reinterpret_cast<const std::type_info *>(vptr[-1]);
    Expect(type != nullptr && std::strcmp(type->name(), "N3ock4smem14TcpConfigStoreE") == 0,
           std::string("the store is a ") + (type ? type->name() : "(no type_info)") + ", not a TcpConfigStore");
    g_offsetToTop = offsetToTop;
    return reinterpret_cast<ock::smem::TcpConfigStore *>(reinterpret_cast<char *>(base) + offsetToTop);
}

ock::smem::TcpConfigStore *Connect(const std::string &ip, uint16_t port)
{
    ock::smem::UrlExtraction url;
    int32_t rc = url.ExtractIpPortFromUrl("tcp://" + ip + ":" + std::to_string(port));
    Expect(rc == 0 && url.ip == ip && url.port == port,
           "parsing the store URL returned " + std::to_string(rc) + " (" + url.ip + ":" + std::to_string(url.port) + ")");
    auto ref = new ock::smem::SmRef<ock::smem::ConfigStore>(
        ock::smem::StoreFactory::CreateStore(ip, port, kModelClient, UINT32_MAX, -1, 10));
    Expect(ref->get() != nullptr, "could not connect to the store at " + ip + ":" + std::to_string(port));
    return TcpStore(ref->get());
}

// Ends the process without the library's orderly shutdown: that joins threads that sleep for
// their poll interval and takes seconds, while ending the process closes the connection at once
// (the server treats it as a client that went away). Static destructors are skipped too, as they
// would run against the library's threads.
[[noreturn]] void Finish(int code)
{
    std::fflush(g_out);
    _exit(code);
}

std::vector<uint8_t> Pattern(size_t size, uint8_t seed)
{
    std::vector<uint8_t> v(size);
    for (size_t i = 0; i < size; ++i) {
        v[i] = static_cast<uint8_t>(seed + i * 131u + (i >> 8));
    }
    return v;
}

std::string Show(const std::vector<uint8_t> &v)
{
    return std::to_string(v.size()) + " bytes";
}

// ---- check: the client is called correctly ------------------------------------------------

int Check(const std::string &ip, uint16_t port, uint64_t seed, size_t maxSize)
{
    Deadline(120);
    auto *store = Connect(ip, port);
    std::mt19937_64 rng(seed);
    const std::string prefix = "mfcheck/" + std::to_string(seed) + "/";

    // Sizes around every power of two up to maxSize (at least 1 MiB), and random ones between.
    maxSize = std::max<size_t>(maxSize, 1u << 20);
    std::vector<size_t> sizes = {1, 2, 3};
    for (size_t p = 4; p <= maxSize; p <<= 1) {
        sizes.insert(sizes.end(), {p - 1, p, p + 1});
    }
    sizes.push_back(maxSize);
    for (int i = 0; i < 32; ++i) {
        sizes.push_back(1 + rng() % maxSize);
    }
    size_t trips = 0;
    for (size_t n : sizes) {
        // Keys of varied length too, up to the 1024 bytes upstream accepts.
        std::string key = prefix + "v" + std::to_string(trips) + "/" + std::string(rng() % 900, 'k');
        std::vector<uint8_t> value(n);
        for (auto &b : value) {
            b = static_cast<uint8_t>(rng());
        }
        int32_t rc = store->Set(key, value);
        Expect(rc == 0, "set " + Show(value) + " returned " + std::to_string(rc));
        std::vector<uint8_t> back(7, 0xee);  // not empty: the result must replace it
        rc = store->GetReal(key, back, 5000);
        Expect(rc == 0, "get " + Show(value) + " returned " + std::to_string(rc));
        Expect(back == value, "get returned " + Show(back) + " that differ from the " + Show(value) + " set");
        // Overwrite with a value of another size: the store must not keep the old tail.
        std::vector<uint8_t> other(1 + rng() % 4096);
        for (auto &b : other) {
            b = static_cast<uint8_t>(rng());
        }
        Expect(store->Set(key, other) == 0, "overwrite failed");
        Expect(store->GetReal(key, back, 5000) == 0 && back == other, "get after overwrite differs");
        ++trips;
    }
    const std::string longest = prefix + std::string(1024 - prefix.size(), 'x');
    Expect(store->Set(longest, Pattern(10, 1)) == 0, "a 1024-byte key was refused");
    Expect(store->Set(longest + "x", Pattern(10, 1)) != 0, "a 1025-byte key was accepted");

    // add: returns the running sum, starting from 0 on a new key.
    const std::string counter = prefix + "counter";
    int64_t sum = 0;
    for (int i = 0; i < 200; ++i) {
        int64_t inc = static_cast<int64_t>(rng() % 2001) - 1000;
        int64_t got = 0x5a5a;
        int32_t rc = store->Add(counter, inc, got);
        sum += inc;
        Expect(rc == 0, "add returned " + std::to_string(rc));
        Expect(got == sum, "add returned " + std::to_string(got) + ", the running sum is " + std::to_string(sum));
    }

    // compare_set: swaps when the value matches, and only then.
    const std::string cas = prefix + "cas";
    auto a = Pattern(300, 1), b = Pattern(300, 2), c = Pattern(77, 3);
    std::vector<uint8_t> exists;
    Expect(store->Set(cas, a) == 0, "set for compare_set failed");
    int32_t rc = store->Cas(cas, a, b, exists);
    Expect(rc == 0, "compare_set with the current value returned " + std::to_string(rc));
    Expect(exists == b, "compare_set that swapped reported " + Show(exists) + ", not the value it stored");
    std::vector<uint8_t> back;
    Expect(store->GetReal(cas, back, 5000) == 0 && back == b, "compare_set that succeeded did not store its value");
    exists.clear();
    rc = store->Cas(cas, a, c, exists);
    Expect(rc == kCasFailed, "compare_set with a stale value returned " + std::to_string(rc) + ", not " +
                                 std::to_string(kCasFailed));
    Expect(exists == b, "compare_set that failed reported " + Show(exists) + ", not the current value");
    Expect(store->GetReal(cas, back, 5000) == 0 && back == b, "compare_set that failed changed the value");

    // A key that is not there is an error, not an empty value.
    rc = store->GetReal(prefix + "absent", back, 0);
    Expect(rc != 0, "get of a missing key succeeded");

    Say("mfbench checked type=TcpConfigStore offset_to_top=%ld round_trips=%zu largest=%zu add=200 compare_set=2 "
        "missing_get_rc=%d\n",
        static_cast<long>(g_offsetToTop), trips, *std::max_element(sizes.begin(), sizes.end()), rc);
    Finish(0);
}

// ---- run: one op in a loop ----------------------------------------------------------------

// Cheap comparison used inside the timed loop (the full one runs before and after it).
bool SampleEqual(const std::vector<uint8_t> &x, const std::vector<uint8_t> &y)
{
    if (x.size() != y.size()) {
        return false;
    }
    const size_t n = x.size(), k = n < 64 ? n : 64;
    return std::memcmp(x.data(), y.data(), k) == 0 && std::memcmp(x.data() + n - k, y.data() + n - k, k) == 0 &&
           std::memcmp(x.data() + n / 2 - k / 2, y.data() + n / 2 - k / 2, k) == 0;
}

int Run(const std::string &ip, uint16_t port, const std::string &op, size_t size, double seconds, int idx,
        const std::string &latFile)
{
    Deadline(static_cast<unsigned>(seconds) + 180);
    auto *store = Connect(ip, port);
    const auto valueA = Pattern(size, 'a'), valueB = Pattern(size, 'b');
    const std::string key = op == "get" ? "bench/get" : "bench/" + op + "/" + std::to_string(idx);
    std::vector<uint8_t> got, exists;
    int64_t counter = 0, base = 0;
    if (op == "get" || op == "compare_set") {
        // Every get client writes the same bytes, so their order does not matter.
        Expect(store->Set(key, valueA) == 0, "initial set failed");
    }
    if (op == "add") {
        Expect(store->Add(key, 0, counter) == 0, "initial add failed");
        base = counter;
    }

    // One op; `full` compares whole values, otherwise samples of them. Returns false on a wrong
    // result, which ends the run with an error after the loop.
    auto once = [&](uint64_t i, bool full) -> bool {
        if (op == "set") {
            return store->Set(key, valueA) == 0;
        }
        if (op == "get") {
            if (store->GetReal(key, got, 5000) != 0) {
                return false;
            }
            return full ? got == valueA : SampleEqual(got, valueA);
        }
        if (op == "add") {
            int64_t now = 0;
            if (store->Add(key, 1, now) != 0 || now != counter + 1) {
                return false;  // one writer per key: exactly the previous value plus one
            }
            counter = now;
            return true;
        }
        // compare_set: alternately a -> b and b -> a, each of which must succeed.
        const auto &from = i % 2 == 0 ? valueA : valueB;
        const auto &to = i % 2 == 0 ? valueB : valueA;
        if (store->Cas(key, from, to, exists) != 0) {
            return false;
        }
        return full ? exists == to : SampleEqual(exists, to);
    };
    if (op != "set" && op != "get" && op != "add" && op != "compare_set") {
        Fail("unknown op " + op);
    }
    uint64_t i = 0;
    for (; i < 20; ++i) {  // warm-up, fully checked
        Expect(once(i, true), op + " returned a wrong result during warm-up");
    }

    Say("mfbench ready\n");
    std::string line;
    Expect(static_cast<bool>(std::getline(std::cin, line)), "no start signal on stdin");

    std::vector<int64_t> lat;
    lat.reserve(1 << 16);
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    uint64_t bad = 0;
    while (true) {
        const auto t0 = Clock::now();
        const bool ok = once(i, false);
        const auto t1 = Clock::now();
        lat.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
        bad += ok ? 0 : 1;
        ++i;
        if (!ok || t1 >= end) {
            break;
        }
    }
    const auto wall = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    Expect(bad == 0, op + " returned a wrong result (op " + std::to_string(i - 1) + ")");

    // The state the loop leaves must be the one it wrote.
    if (op == "set") {
        Expect(store->GetReal(key, got, 5000) == 0 && got == valueA, "get after the set loop differs");
    } else if (op == "add") {
        int64_t now = 0;
        Expect(store->Add(key, 0, now) == 0 && now == base + static_cast<int64_t>(i),
               "the counter is " + std::to_string(now) + " after " + std::to_string(i) + " adds of 1 to " +
                   std::to_string(base));
    } else if (op == "compare_set") {
        Expect(store->GetReal(key, got, 5000) == 0 && got == (i % 2 == 0 ? valueA : valueB),
               "the value after the compare_set loop is not the last one swapped in");
    }

    FILE *f = std::fopen(latFile.c_str(), "wb");
    Expect(f != nullptr, "cannot write " + latFile);
    Expect(std::fwrite(lat.data(), sizeof(int64_t), lat.size(), f) == lat.size() && std::fclose(f) == 0,
           "cannot write " + latFile);
    Say("mfbench result ops=%zu wall_ns=%lld\n", lat.size(), static_cast<long long>(wall));
    // Stay connected until the caller has every client's result: the upstream server drops all
    // keys when it sees client connections close ("all client link broken, will clear data"),
    // which would pull the key from under a client that is still checking it.
    while (std::getline(std::cin, line)) {
    }
    Finish(0);
}

// ---- serve: an upstream store server ------------------------------------------------------

int Serve(const std::string &ip, uint16_t port)
{
    const std::string url = "tcp://" + ip + ":" + std::to_string(port);
    int32_t rc = smem_create_config_store(url.c_str(), 0);
    Expect(rc == 0, "smem_create_config_store(" + url + ") returned " + std::to_string(rc));
    Say("mfbench ready %s\n", url.c_str());
    // Serves until the benchmark closes our stdin (or exits, which closes it too).
    char buf[256];
    while (read(0, buf, sizeof buf) > 0) {
    }
    // The store's data lives in this process only: ending it is the shutdown (see Finish()).
    Finish(0);
}

}  // namespace

int main(int argc, char **argv)
{
    const std::string mode = argc > 1 ? argv[1] : "";
    g_outFd = dup(1);
    g_out = g_outFd >= 0 ? fdopen(g_outFd, "w") : nullptr;
    if (g_out == nullptr || dup2(2, 1) != 1) {
        std::perror("store_client: cannot set up stdout");
        return 70;
    }
    // Errors only (its connection layer traces regardless, on what is now stderr).
    smem_set_log_level(3);
    if (mode == "serve" && argc == 4) {
        return Serve(argv[2], static_cast<uint16_t>(std::atoi(argv[3])));
    }
    if (mode == "check" && argc == 6) {
        return Check(argv[2], static_cast<uint16_t>(std::atoi(argv[3])), std::strtoull(argv[4], nullptr, 10),
                     std::strtoull(argv[5], nullptr, 10));
    }
    if (mode == "run" && argc == 9) {
        return Run(argv[2], static_cast<uint16_t>(std::atoi(argv[3])), argv[4], std::strtoull(argv[5], nullptr, 10),
                   std::atof(argv[6]), std::atoi(argv[7]), argv[8]);
    }
    std::fprintf(stderr,
                 "usage: %s serve IP PORT | check IP PORT SEED MAXSIZE | run IP PORT OP SIZE SECONDS IDX LATFILE\n",
                 argv[0]);
    return 64;
}
