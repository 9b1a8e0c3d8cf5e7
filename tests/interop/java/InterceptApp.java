// A legacy Java app for tests/interop/intercept.rs, run as a single-file source program
// (`java InterceptApp.java ROUTED DIRECT`). It knows nothing of bearerd: its proxy and trust
// come from the command line's system properties (https.proxyHost, https.proxyPort,
// http.nonProxyHosts, javax.net.ssl.trustStore), as an unchanged app's would.
//
// It calls ROUTED (https://, through the proxy) with java.net.http.HttpClient and with
// HttpsURLConnection, DIRECT (https://, a host http.nonProxyHosts names) with HttpClient, and
// a host without a route, which the proxy must refuse. It prints one JSON object: the
// statuses, the HTTP version HttpClient spoke, the echoed requests, and whether the
// unrouted call failed.

import java.io.IOException;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import javax.net.ssl.HttpsURLConnection;

public class InterceptApp {
    public static void main(String[] args) throws Exception {
        String routed = args[0];
        String direct = args[1];
        // The default client: the default ProxySelector (the system properties above),
        // HTTP/2 offered by ALPN, the default SSLContext (javax.net.ssl.trustStore).
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();

        HttpResponse<String> modern = client.send(
                HttpRequest.newBuilder(URI.create(routed + "/v1/java?x=1")).build(),
                HttpResponse.BodyHandlers.ofString());

        HttpsURLConnection legacy =
                (HttpsURLConnection) new URL(routed + "/v1/legacy").openConnection();
        legacy.setConnectTimeout(10_000);
        legacy.setReadTimeout(10_000);
        int legacyStatus = legacy.getResponseCode();
        String legacyBody;
        try (var in = legacy.getInputStream()) {
            legacyBody = new String(in.readAllBytes(), StandardCharsets.UTF_8);
        }
        boolean legacyProxied = legacy.usingProxy();

        HttpResponse<String> bypass = client.send(
                HttpRequest.newBuilder(URI.create(direct + "/direct")).build(),
                HttpResponse.BodyHandlers.ofString());

        boolean refused;
        try {
            client.send(HttpRequest.newBuilder(URI.create("https://unrouted.example/")).build(),
                    HttpResponse.BodyHandlers.discarding());
            refused = false;
        } catch (IOException e) {
            refused = true;
        }

        System.out.println("{\"status\": [" + modern.statusCode() + ", " + legacyStatus + ", "
                + bypass.statusCode() + "], \"version\": \"" + modern.version()
                + "\", \"legacy_proxied\": " + legacyProxied
                + ", \"seen\": [" + modern.body() + ", " + legacyBody + ", " + bypass.body()
                + "], \"refused\": " + refused + "}");
    }
}
