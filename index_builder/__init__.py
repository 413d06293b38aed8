"""one2one offline builder: from event logs to a published ranking bundle."""
