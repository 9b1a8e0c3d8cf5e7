// An unchanged Go app behind bearerd's interception (tests/interop/intercept.rs): net/http's
// default client, which takes HTTPS_PROXY from the environment (http.ProxyFromEnvironment) and
// trusts SSL_CERT_FILE (on Linux it replaces the system roots: bearerd's ca_bundle_file holds
// both). Two GETs on one kept-alive tunnel to the routed host, then one to a host without a
// route, which the proxy must refuse. Prints what it saw as JSON.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
)

func get(url string) (int, string, map[string]any, error) {
	response, err := http.Get(url)
	if err != nil {
		return 0, "", nil, err
	}
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	if err != nil {
		return 0, "", nil, err
	}
	var seen map[string]any
	if err := json.Unmarshal(body, &seen); err != nil {
		return 0, "", nil, fmt.Errorf("not JSON: %w: %s", err, body)
	}
	return response.StatusCode, response.Proto, seen, nil
}

func main() {
	base := os.Args[1]
	result := map[string]any{}
	var statuses []int
	var protos []string
	var seen []map[string]any
	for _, path := range []string{"/v1/go?x=1", "/v1/two"} {
		status, proto, echoed, err := get(base + path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		statuses = append(statuses, status)
		protos = append(protos, proto)
		seen = append(seen, echoed)
	}
	_, _, _, err := get("https://unrouted.example/")
	result["status"] = statuses
	result["proto"] = protos
	result["seen"] = seen
	result["refused"] = err != nil
	if err != nil {
		result["refusal"] = err.Error()
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}
