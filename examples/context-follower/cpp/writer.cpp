// Writes a shared context step by step: a first value, five updates of "seq", then a last
// update that removes "scratch" and sets "done". The context's name is argv[1].
//   c++ -std=c++17 writer.cpp $(pkg-config --cflags --libs knit) -o context-writer
#include <knit/knit.hpp>

#include <iostream>
#include <string>

int main(int argc, char** argv) try {
    std::string name = argc > 1 ? argv[1] : "examples.instrument";
    knit::Client client = knit::Client::connect("context-writer-cpp");
    client.context_set(name, R"({"symbol":"VOD.L","writer":"cpp","seq":0,"scratch":true})");
    for (int seq = 1; seq <= 5; seq++) client.context_update(name, R"({"seq":)" + std::to_string(seq) + "}");
    uint64_t version = client.context_update(name, R"({"scratch":null,"done":true})");
    std::cout << "wrote " << name << " up to version " << version << "\n";
} catch (const knit::Error& e) {
    std::cerr << "context-writer: " << e.name() << ": " << e.what() << "\n";
    return 1;
}
