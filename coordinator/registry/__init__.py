"""go-zero's service registry in etcd: target parsing, publishing and resolving."""
