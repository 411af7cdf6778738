"""Java's `java.net.http.HttpClient` with its default settings (HTTP/2
preferred: `Upgrade: h2c` on http://, ALPN `h2,http/1.1` over TLS), run as
a single-file source program by the JDK's `java` launcher."""

from __future__ import annotations

import collections
import json
import os

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.interop.harness import Estat, assert_stored_once, require_binary, run

JAVA = "/usr/bin/java"

# Posts `count` events to `url`, one request each, on one default client;
# prints one line per request: the status and the body, or `error` and the
# exception. With a certificate file, only the trust changes (an SSLContext
# that trusts it); everything else stays the client's default.
SOURCE = r"""
import java.io.FileInputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class PostEvents {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        String prefix = args[1];
        int count = Integer.parseInt(args[2]);
        HttpClient client;
        if (args.length > 3) {
            KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
            trust.load(null, null);
            try (FileInputStream pem = new FileInputStream(args[3])) {
                trust.setCertificateEntry("estat",
                    CertificateFactory.getInstance("X.509").generateCertificate(pem));
            }
            TrustManagerFactory factory =
                TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            factory.init(trust);
            SSLContext context = SSLContext.getInstance("TLS");
            context.init(null, factory.getTrustManagers(), null);
            client = HttpClient.newBuilder().sslContext(context).build();
        } else {
            client = HttpClient.newHttpClient();
        }
        for (int n = 0; n < count; n++) {
            String body = "{\"id\":\"" + prefix + "-" + n + "\",\"client\":\"java\"}";
            HttpRequest request = HttpRequest.newBuilder(URI.create(url + "/collect"))
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(body))
                .build();
            try {
                HttpResponse<String> response =
                    client.send(request, HttpResponse.BodyHandlers.ofString());
                System.out.println(response.statusCode() + " " + response.version() + " "
                    + response.body().trim());
            } catch (Exception error) {
                System.out.println("error " + error);
            }
        }
    }
}
"""

COUNT = 20


class JavaHttpClient(unittest.TestCase):
    timeout = 180

    def post_events(self, workdir: str, url: str, prefix: str, *extra: str) -> list[str]:
        source = os.path.join(workdir, "PostEvents.java")
        with open(source, "w") as handle:
            handle.write(SOURCE)
        done = run([require_binary(JAVA, "openjdk-17-jdk-headless"), source, url, prefix,
                    str(COUNT), *extra], timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        return done.stdout.decode().splitlines()

    def assertAllAccepted(self, answers: list[str]) -> None:
        expected = "202 HTTP_1_1 " + json.dumps({"status": "accepted"}, separators=(",", ":"))
        self.assertEqual(dict(collections.Counter(answers)), {expected: COUNT},
                         "answers the client got, with how many times each")

    @inlineCallbacks
    def test_default_client_on_http(self):
        """The default client sends `Upgrade: h2c` on the first request;
        every request is answered 202 in HTTP/1.1 and stored."""
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}).start()
        self.assertAllAccepted(self.post_events(estat.workdir, estat.url, "java-http"))
        assert_stored_once(self, (yield estat.stored()), [f"java-http-{n}" for n in range(COUNT)])

    @inlineCallbacks
    def test_default_client_over_tls(self):
        """Over TLS the default client offers ALPN h2,http/1.1; the server
        selects http/1.1."""
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}, tls=True).start()
        self.assertAllAccepted(self.post_events(estat.workdir, estat.tls_url, "java-tls",
                                                estat.cert))
        assert_stored_once(self, (yield estat.stored()), [f"java-tls-{n}" for n in range(COUNT)])
