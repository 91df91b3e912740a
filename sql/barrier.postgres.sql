-- barrier.postgres.sql: the sub-transaction barrier table, compatible with dtm's
-- sqls/dtmcli.barrier.postgres.sql (same columns and unique key, no DROP TABLE).
-- coordinator.client.barrier_postgres.ensure_barrier_table(conn) runs this file.
CREATE SCHEMA IF NOT EXISTS dtm_barrier;
CREATE SEQUENCE IF NOT EXISTS dtm_barrier.barrier_seq;
CREATE TABLE IF NOT EXISTS dtm_barrier.barrier (
  id bigint NOT NULL DEFAULT nextval('dtm_barrier.barrier_seq'),
  trans_type varchar(45) DEFAULT '',
  gid varchar(128) DEFAULT '',
  branch_id varchar(128) DEFAULT '',
  op varchar(45) DEFAULT '',
  barrier_id varchar(45) DEFAULT '',
  reason varchar(45) DEFAULT '',
  create_time timestamp(0) with time zone DEFAULT now(),
  update_time timestamp(0) with time zone DEFAULT now(),
  PRIMARY KEY (id),
  CONSTRAINT uniq_barrier UNIQUE (gid, branch_id, op, barrier_id)
);
