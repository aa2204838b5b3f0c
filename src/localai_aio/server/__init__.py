"""The HTTP plumbing every protocol shares: the application's keys, the middlewares (access, body, request
log, error responses), Server-Sent Events, the request schemas generated from the vendored spec and the
OpenAPI document, model live reload and the retention sweep. It knows no protocol's routes."""
