// Serves the method Examples.Price: it answers {request, bid, ask, server} to any request.
// Prints one line once it serves, then serves until its standard input closes.
//   c++ -std=c++17 server.cpp $(pkg-config --cflags --libs knit) -o price-server
#include <knit/knit.hpp>

#include <iostream>
#include <string>

int main() try {
    knit::Client client = knit::Client::connect("price-server-cpp");  // $KNIT_GATEWAY
    client.register_method("Examples.Price", [](const knit::Call& call) {
        return R"({"request":)" + call.args_json + R"(,"bid":100.25,"ask":100.75,"server":"cpp"})";
    });
    std::cout << "price-server (cpp) ready" << std::endl;
    for (std::string line; std::getline(std::cin, line);) {
    }  // serve until stdin closes; the client closes when it goes out of scope
} catch (const knit::Error& e) {
    std::cerr << "price-server: " << e.name() << ": " << e.what() << "\n";
    return 1;
}
