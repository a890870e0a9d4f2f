// Writes a shared context step by step: a first value, five updates of "seq", then a last
// update that removes "scratch" and sets "done". The context's name is args[0].
//   mcs -out:writer.exe Writer.cs bindings/dotnet/Knit/*.cs
using System;
using Knit;

static class ContextWriter
{
    static int Main(string[] args)
    {
        var name = args.Length > 0 ? args[0] : "examples.instrument";
        try
        {
            using (var client = new KnitClient("context-writer-csharp"))
            {
                client.ContextSet(name, "{\"symbol\":\"VOD.L\",\"writer\":\"csharp\",\"seq\":0,\"scratch\":true}");
                for (int seq = 1; seq <= 5; seq++) client.ContextUpdate(name, "{\"seq\":" + seq + "}");
                var version = client.ContextUpdate(name, "{\"scratch\":null,\"done\":true}");
                Console.WriteLine("wrote " + name + " up to version " + version);
            }
            return 0;
        }
        catch (KnitException e)
        {
            Console.Error.WriteLine("context-writer: " + e.StatusName + ": " + e.Message);
            return 1;
        }
    }
}
