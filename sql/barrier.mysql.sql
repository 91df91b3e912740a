-- barrier.mysql.sql: the sub-transaction barrier table, compatible with dtm's
-- sqls/dtmcli.barrier.mysql.sql (same columns and unique key, no DROP TABLE).
-- coordinator.client.barrier_mysql.ensure_barrier_table(conn) runs this file.
CREATE DATABASE IF NOT EXISTS dtm_barrier DEFAULT CHARACTER SET utf8mb4;
CREATE TABLE IF NOT EXISTS dtm_barrier.barrier (
  id bigint(22) PRIMARY KEY AUTO_INCREMENT,
  trans_type varchar(45) DEFAULT '',
  gid varchar(128) DEFAULT '',
  branch_id varchar(128) DEFAULT '',
  op varchar(45) DEFAULT '',
  barrier_id varchar(45) DEFAULT '',
  reason varchar(45) DEFAULT '' COMMENT 'the op that inserted this row',
  create_time datetime DEFAULT now(),
  update_time datetime DEFAULT now(),
  KEY (create_time),
  KEY (update_time),
  UNIQUE KEY (gid, branch_id, op, barrier_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
