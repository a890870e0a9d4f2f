// Calls Examples.Price for a symbol (default VOD.L) and prints the invocation result as JSON.
//   c++ -std=c++17 client.cpp $(pkg-config --cflags --libs knit) -o price-client
#include <knit/knit.hpp>

#include <iostream>
#include <string>

int main(int argc, char** argv) try {
    std::string symbol = argc > 1 ? argv[1] : "VOD.L";
    knit::Client client = knit::Client::connect("price-client-cpp");
    knit::InvokeOptions o;
    o.timeout_ms = 10000;
    std::cout << client.invoke("Examples.Price", R"({"symbol":")" + symbol + R"("})", o) << "\n";
} catch (const knit::Error& e) {  // TimeoutError, RemoteError, NotFoundError, …
    std::cerr << "price-client: " << e.name() << ": " << e.what() << "\n";
    return 1;
}
