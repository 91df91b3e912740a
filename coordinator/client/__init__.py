"""The asyncio SDK: build global transactions, answer branch calls, and the barrier.

It speaks dtm's HTTP protocol, so it works against this coordinator and against dtm;
`DtmGrpcClient` speaks dtm's gRPC API instead, and `grpc_branch_handler` answers gRPC
branch calls.
Database drivers are optional: the PostgreSQL and MySQL barrier backends import asyncpg
and aiomysql only when they are used.
"""

from coordinator.client.barrier import BarrierResult, BranchBarrier, SqlBarrier
from coordinator.client.barrier_mysql import MysqlBarrier
from coordinator.client.barrier_postgres import PostgresBarrier
from coordinator.client.barrier_redis import RedisBarrier
from coordinator.client.errors import (
    BranchCallError,
    CoordinatorUnavailable,
    DtmError,
    DuplicatedRequest,
    RequestRejected,
    TransactionFailed,
    TransactionOngoing,
)
from coordinator.client.gid import local_gid, new_gid
from coordinator.client.grpc_branch import branch_info, grpc_branch_handler
from coordinator.client.grpc_client import DtmGrpcClient
from coordinator.client.http import BranchReply, DtmClient
from coordinator.client.msg import Msg
from coordinator.client.options import TransOptions
from coordinator.client.participant import (
    BranchInfo,
    branch_handler,
    query_prepared_handler,
    response_for,
)
from coordinator.client.registry import register_service, resolve_target
from coordinator.client.saga import Saga
from coordinator.client.tcc import Tcc, tcc_global
from coordinator.client.workflow import (
    Workflow,
    WorkflowError,
    WorkflowFunction,
    WorkflowRegistry,
)
from coordinator.client.xa import Xa, register_xa_branch, xa_global
from coordinator.client.xa_mysql import xa_local_transaction, xa_phase2

__all__ = [
    "BarrierResult",
    "BranchBarrier",
    "BranchCallError",
    "BranchInfo",
    "BranchReply",
    "CoordinatorUnavailable",
    "DtmClient",
    "DtmError",
    "DtmGrpcClient",
    "DuplicatedRequest",
    "Msg",
    "MysqlBarrier",
    "PostgresBarrier",
    "RedisBarrier",
    "RequestRejected",
    "Saga",
    "SqlBarrier",
    "Tcc",
    "TransOptions",
    "TransactionFailed",
    "TransactionOngoing",
    "Workflow",
    "WorkflowError",
    "WorkflowFunction",
    "WorkflowRegistry",
    "Xa",
    "branch_handler",
    "branch_info",
    "grpc_branch_handler",
    "local_gid",
    "new_gid",
    "query_prepared_handler",
    "register_service",
    "register_xa_branch",
    "resolve_target",
    "response_for",
    "tcc_global",
    "xa_global",
    "xa_local_transaction",
    "xa_phase2",
]
