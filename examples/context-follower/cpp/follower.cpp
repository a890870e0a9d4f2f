// Follows a shared context (argv[1]) and prints each version it sees; exits once the context
// says "done": true, printing its final value (or fails after 20 s).
//   c++ -std=c++17 follower.cpp $(pkg-config --cflags --libs knit) -pthread -o context-follower
#include <knit/knit.hpp>

#include <chrono>
#include <condition_variable>
#include <iostream>
#include <mutex>
#include <string>

int main(int argc, char** argv) try {
    std::string name = argc > 1 ? argv[1] : "examples.instrument";
    knit::Client client = knit::Client::connect("context-follower-cpp");
    std::mutex mu;
    std::condition_variable cv;
    std::string last;
    // Runs on knit's dispatcher thread; ends when `sub` is destroyed.
    knit::Subscription sub = client.context_subscribe(name, [&](const knit::ContextUpdate& u) {
        std::cout << "version " << u.version << ": " << u.delta_json << std::endl;
        if (u.data_json.find(R"("done":true)") != std::string::npos) {  // a real app parses JSON
            std::lock_guard<std::mutex> g(mu);
            last = u.data_json;
            cv.notify_all();
        }
    });
    std::cout << "following " << name << std::endl;
    std::unique_lock<std::mutex> g(mu);
    if (!cv.wait_for(g, std::chrono::seconds(20), [&] { return !last.empty(); })) {
        std::cerr << "context-follower: no \"done\" within 20 s\n";
        return 1;
    }
    std::cout << "followed " << last << "\n";
} catch (const knit::Error& e) {
    std::cerr << "context-follower: " << e.name() << ": " << e.what() << "\n";
    return 1;
}
