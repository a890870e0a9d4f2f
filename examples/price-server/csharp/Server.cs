// Serves the method Examples.Price: it answers {request, bid, ask, server} to any request.
// Prints one line once it serves, then serves until its standard input closes.
//   mcs -out:server.exe Server.cs bindings/dotnet/Knit/*.cs   (or reference Knit.csproj)
using System;
using Knit;

static class PriceServer
{
    static int Main()
    {
        try
        {
            using (var client = new KnitClient("price-server-csharp")) // $KNIT_GATEWAY
            {
                client.Register("Examples.Price", call =>
                    "{\"request\":" + call.ArgsJson + ",\"bid\":100.25,\"ask\":100.75,\"server\":\"csharp\"}");
                Console.WriteLine("price-server (csharp) ready");
                Console.Out.Flush();
                Console.In.ReadToEnd(); // serve until stdin closes
            }
            return 0;
        }
        catch (KnitException e)
        {
            Console.Error.WriteLine("price-server: " + e.StatusName + ": " + e.Message);
            return 1;
        }
    }
}
