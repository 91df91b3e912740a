"""A go-zero-style transfer: two gRPC services found through etcd, the coordinator too.

TransOut (MariaDB) and TransIn (PostgreSQL) are `grpc.aio` services with the barrier on
both, each published in etcd as go-zero's publisher does; the driver finds the
coordinator through etcd (``etcd://…/dtmservice``) and submits over dtm's gRPC API a
saga, a TCC and messages whose branch URLs are ``etcd://…/<key>/pb.Trans/<Method>``.
"""
