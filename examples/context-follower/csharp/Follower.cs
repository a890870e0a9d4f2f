// Follows a shared context (args[0]) and prints each version it sees; exits once the context
// says "done": true, printing its final value (or fails after 20 s).
//   mcs -out:follower.exe Follower.cs bindings/dotnet/Knit/*.cs
using System;
using System.Threading;
using Knit;

static class ContextFollower
{
    static int Main(string[] args)
    {
        var name = args.Length > 0 ? args[0] : "examples.instrument";
        try
        {
            using (var client = new KnitClient("context-follower-csharp"))
            {
                string last = null;
                var done = new ManualResetEventSlim(false);
                // Runs on knit's dispatcher thread; ends when disposed (or with the client).
                using (client.ContextSubscribe(name, u =>
                {
                    Console.WriteLine("version " + u.Version + ": " + u.DeltaJson);
                    if (u.DataJson.Contains("\"done\":true")) // a real app parses the JSON
                    {
                        last = u.DataJson;
                        done.Set();
                    }
                }))
                {
                    Console.WriteLine("following " + name);
                    Console.Out.Flush();
                    if (!done.Wait(TimeSpan.FromSeconds(20)))
                    {
                        Console.Error.WriteLine("context-follower: no \"done\" within 20 s");
                        return 1;
                    }
                }
                Console.WriteLine("followed " + last);
            }
            return 0;
        }
        catch (KnitException e)
        {
            Console.Error.WriteLine("context-follower: " + e.StatusName + ": " + e.Message);
            return 1;
        }
    }
}
