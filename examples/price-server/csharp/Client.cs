// Calls Examples.Price for a symbol (default VOD.L) and prints the invocation result as JSON.
//   mcs -out:client.exe Client.cs bindings/dotnet/Knit/*.cs
using System;
using Knit;

static class PriceClient
{
    static int Main(string[] args)
    {
        var symbol = args.Length > 0 ? args[0] : "VOD.L";
        try
        {
            using (var client = new KnitClient("price-client-csharp"))
            {
                Console.WriteLine(client.Invoke("Examples.Price", "{\"symbol\":\"" + symbol + "\"}",
                                                new InvokeOptions { TimeoutMs = 10000 }));
            }
            return 0;
        }
        catch (KnitException e) // KnitTimeoutException, RemoteException, NotFoundException, …
        {
            Console.Error.WriteLine("price-client: " + e.StatusName + ": " + e.Message);
            return 1;
        }
    }
}
